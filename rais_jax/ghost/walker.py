"""The jaxpr walker: finds where parameters meet the data (the *sites*).

A loss traced for one example is interpreted equation by equation, each value
tagged with what it depends on (:class:`Tag`): the example (data), parameter
leaves only, or neither. An equation with a data input and a parameter input
is a :class:`Site`; every path from a parameter to the loss crosses exactly
one. A :class:`Walker` records the sites ("discover"), their parameter
operands ("param"), or runs the forward pass with a perturbation added to
each site's outputs and records the data operands ("forward"). Calls to
``jit``-ed functions, ``closed_call`` and ``remat`` are inlined so the
layers inside them are seen, and a ``scan`` of at most :data:`MAX_UNROLL`
steps whose parameters are all scanned over (stacked layers) is unrolled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax.extend as jex
import jax.numpy as jnp

# Call-like primitives whose body is interpreted in place, so the sites inside
# are seen. Their parameter holding the body:
_INLINE = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
           "core_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr"}
# Unary parameter-only ops that preserve the norm of the cotangent they pass
# back (their transpose is an isometry onto its image).
_ISOMETRIC = {"transpose", "reshape", "squeeze", "expand_dims", "copy",
              "copy_p", "convert_element_type", "broadcast_in_dim",
              "reduce_precision"}
_CASTS = ("convert_element_type", "copy", "copy_p", "reduce_precision")
# Scans over at most this many steps whose parameters are all scanned over
# (stacked layers, not weights shared by the steps) are unrolled, so each
# step's layers are ghosted; other scans fall back to vmap.
MAX_UNROLL = 64


class Tag(NamedTuple):
  """What a value of the one-example jaxpr depends on (static)."""
  data: bool = False  # depends on the example
  leaves: frozenset = frozenset()  # parameter leaves, if it does not
  iso: bool = False  # a norm-preserving image of its single leaf
  layout: Optional[int] = None  # 2-D leaf seen as is (0) or transposed (1)
  part: tuple[int, ...] = ()  # leaf[part] (set by unrolled scans), if iso
  exact: bool = False  # equal to leaf[part] up to a cast

  @property
  def is_param(self) -> bool:
    return not self.data and bool(self.leaves)


CONST = Tag()
DATA = Tag(data=True)
ABSENT = object()  # a value the current walk does not compute


@dataclasses.dataclass(frozen=True)
class Site:
  eqn: Any  # jax.extend.core.JaxprEqn
  in_tags: tuple[Tag, ...]

  @property
  def param_slots(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.in_tags) if t.is_param)

  @property
  def data_slots(self) -> tuple[int, ...]:
    return tuple(i for i, t in enumerate(self.in_tags) if t.data)

  @property
  def fixed_slots(self) -> tuple[int, ...]:
    """Constant (non-literal) inputs: neither data nor parameters."""
    return tuple(i for i, (t, v) in enumerate(zip(self.in_tags, self.eqn.invars))
                 if not t.data and not t.leaves
                 and not isinstance(v, jex.core.Literal))

  @property
  def perturbed(self) -> tuple[bool, ...]:
    return tuple(jnp.issubdtype(v.aval.dtype, jnp.inexact)
                 for v in self.eqn.outvars)


def bind(eqn, vals: Sequence[Any]) -> list[Any]:
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*vals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _out_tag(eqn, in_tags: Sequence[Tag]) -> Tag:
  """Tag of a non-site equation's outputs."""
  if any(t.data for t in in_tags):
    return DATA
  leaves = frozenset().union(*(t.leaves for t in in_tags))
  live = [(t, v) for t, v in zip(in_tags, eqn.invars) if t.leaves]
  iso = (len(leaves) == 1 and len(live) == 1 and live[0][0].iso
         and eqn.primitive.name in _ISOMETRIC and len(eqn.outvars) == 1
         and math.prod(live[0][1].aval.shape)
         == math.prod(eqn.outvars[0].aval.shape)
         and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact))
  if not iso:
    return Tag(leaves=leaves)
  parent, name = live[0][0], eqn.primitive.name
  exact = parent.exact and name in _CASTS
  layout = None
  if parent.layout is not None:
    if name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
      layout = 1 - parent.layout
    elif name in _CASTS:
      layout = parent.layout
  return Tag(leaves=leaves, iso=True, layout=layout, part=parent.part,
              exact=exact)


def _slice_tag(tag: Tag, i: int, ndim: int) -> Tag:
  """Tag of ``x[i]`` for x with tag ``tag`` (a scanned-over input)."""
  if not tag.iso:
    return tag
  return Tag(leaves=tag.leaves, iso=True, part=tag.part + (i,),
              exact=tag.exact, layout=0 if tag.exact and ndim == 2 else None)


def _merge_tags(tags: Sequence[Tag]) -> Tag:
  if any(t.data for t in tags):
    return DATA
  return Tag(leaves=frozenset().union(*(t.leaves for t in tags)))


class Walker:
  """Interprets a one-example jaxpr, tracking tags and handling sites.

  mode "discover": tags only, records the sites. "param": computes only
  parameter-only values, records the parameter operands of every site.
  "forward": computes everything, adds ``perts[s]`` to the outputs of site s
  and records its data and constant operands.
  """

  def __init__(self, mode: str, perts: Optional[list] = None):
    self.mode = mode
    self.sites: list[Site] = []
    self.param_operands: list[list[Any]] = []
    self.data_operands: list[list[Any]] = []
    self.fixed_operands: list[list[Any]] = []
    self._perts = perts
    self._count = 0

  def run(self, jaxpr, consts, args, const_tags, arg_tags):
    env: dict[Any, tuple[Any, Tag]] = {}

    def read(v):
      if isinstance(v, jex.core.Literal):
        return v.val, CONST
      return env[v]

    for v, x, t in zip(jaxpr.constvars, consts, const_tags):
      env[v] = (x, t)
    for v, x, t in zip(jaxpr.invars, args, arg_tags):
      env[v] = (x, t)
    for eqn in jaxpr.eqns:
      vals, tags = zip(*map(read, eqn.invars)) if eqn.invars else ((), ())
      is_site = any(t.data for t in tags) and any(t.is_param for t in tags)
      if is_site and eqn.primitive.name in _INLINE:
        body = eqn.params[_INLINE[eqn.primitive.name]]
        inner, inner_consts = ((body.jaxpr, body.consts)
                               if hasattr(body, "consts") else (body, ()))
        outs, out_tags = self.run(inner, inner_consts, vals,
                                  [CONST] * len(inner_consts), tags)
      elif is_site and _unrollable(eqn, tags):
        outs, out_tags = self._unroll_scan(eqn, vals, tags)
      elif is_site:
        outs = self._site(eqn, vals, tags)
        out_tags = [DATA] * len(eqn.outvars)
      else:
        tag = _out_tag(eqn, tags)
        computable = all(v is not ABSENT for v in vals)
        outs = (bind(eqn, vals) if computable
                else [ABSENT] * len(eqn.outvars))
        out_tags = [tag] * len(eqn.outvars)
      for v, x, t in zip(eqn.outvars, outs, out_tags):
        env[v] = (x, t)
    outs = [read(v) for v in jaxpr.outvars]
    return [x for x, _ in outs], [t for _, t in outs]

  def _unroll_scan(self, eqn, vals, tags):
    p = eqn.params
    body, (nc, nk) = p["jaxpr"], _scan_consts_and_carry(eqn)
    carry, carry_tags = list(vals[nc:nc + nk]), list(tags[nc:nc + nk])
    steps = range(p["length"])
    ys = [None] * p["length"]
    for i in (reversed(steps) if p["reverse"] else steps):
      xs = [ABSENT if x is ABSENT else x[i] for x in vals[nc + nk:]]
      xs_tags = [_slice_tag(t, i, v.aval.ndim - 1)
                 for t, v in zip(tags[nc + nk:], eqn.invars[nc + nk:])]
      outs, out_tags = self.run(
          body.jaxpr, body.consts, [*vals[:nc], *carry, *xs],
          [CONST] * len(body.consts), [*tags[:nc], *carry_tags, *xs_tags])
      carry, carry_tags = list(outs[:nk]), list(out_tags[:nk])
      ys[i] = (outs[nk:], out_tags[nk:])
    stacked = [ABSENT if any(y is ABSENT for y in col) else jnp.stack(col)
               for col in zip(*(y[0] for y in ys))]
    stacked_tags = [_merge_tags(col) for col in zip(*(y[1] for y in ys))]
    return carry + stacked, carry_tags + stacked_tags

  def _site(self, eqn, vals, tags):
    site = Site(eqn, tuple(tags))
    self.sites.append(site)
    if self.mode == "param":
      self.param_operands.append([vals[i] for i in site.param_slots])
    if self.mode != "forward":
      return [ABSENT] * len(eqn.outvars)
    outs = bind(eqn, vals)
    perts = self._perts[self._count]
    self._count += 1
    outs = [o if p is None else o + p for o, p in zip(outs, perts)]
    self.data_operands.append([vals[i] for i in site.data_slots])
    self.fixed_operands.append([vals[i] for i in site.fixed_slots])
    return outs


def _unrollable(eqn, tags: Sequence[Tag]) -> bool:
  if eqn.primitive.name != "scan" or eqn.params["length"] > MAX_UNROLL:
    return False
  return not any(t.is_param for t in tags[:_scan_consts_and_carry(eqn)[0]])


def _scan_consts_and_carry(eqn) -> tuple[int, int]:
  """How many of a scan's operands are constants and carries.

  JAX ≤ 0.10 has them as parameters; from 0.11 the operands' grouping is a
  flat tree ``ft_in`` of (constants, carries, xs).
  """
  p = eqn.params
  if "num_consts" in p:
    return p["num_consts"], p["num_carry"]
  consts, carry, _ = p["ft_in"].unpack()
  return len(consts), len(carry)
