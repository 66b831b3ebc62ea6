"""Exact per-example gradient norms from one backward pass (ghost norms).

For a dense layer y = x W that example k sees at positions t = 1..T,
∇_W f_k = Σ_t x_{kt} δ_{kt}ᵀ with δ_{kt} = ∂f_k/∂y_{kt}, so

    ‖∇_W f_k‖² = Σ_{t,t'} (x_{kt}·x_{kt'}) (δ_{kt}·δ_{kt'})        (Gram form)

(= ‖x_k‖²‖δ_k‖² when T = 1). x comes from the forward pass and every δ from
*one* ordinary backward pass, taken with respect to a zero perturbation added
to each layer output; the m per-example gradients are never formed. Where
T(A + C) > A·C (A inputs, C outputs) the per-example gradient x_kᵀδ_k is
cheaper to form than the Gram matrices, and it is formed instead.
Goodfellow (2015), "Efficient per-example gradient computations"; Li et al.
(2022), "Large language models can be strong differentially private learners"
(ghost clipping).

This module does that for any JAX function by reading its jaxpr. The loss of
*one* example is traced; a *site* is an equation where a value that depends on
the parameters but not on the data (a weight, or a transpose, cast or
broadcast of one) meets the data. Every path from a parameter to the loss
crosses exactly one site, so the per-example gradient is a sum over sites of
the pull-back, through the parameter-only computation h, of the site's local
per-example gradient. For each parameter leaf:

* used by exactly one ``dot_general`` (dense, einsum, attention projection),
  ``conv_general_dilated`` (as a dense layer over the input patches of each
  feature group) or embedding ``gather`` through a norm-preserving h
  (transpose, reshape, cast): the Gram form above or the per-example
  gradient, whichever is cheaper (for embeddings, the rows of repeated tokens
  are summed per example);
* a 2-D weight used by several such sites (a tied embedding / output layer):
  one joint Gram over all its uses, when cheaper than the per-example
  gradient;
* otherwise (biases and scales broadcast into the data, parameters combined
  with each other, tied weights where the Gram form is dearer): the local
  per-example gradient of each site is formed by ``vmap`` of that one
  equation's VJP (cheap for elementwise uses) and pulled back through h,
  summing all uses of a leaf before its norm is taken, so shared weights are
  exact;
* sites that are higher-order equations (``while``, ``cond``,
  ``custom_jvp_call``, a ``scan`` whose steps share a weight, ...) are handled
  the same way, i.e. ``vmap`` over that whole operation's VJP; a warning names
  the parameters concerned.

Calls to ``jit``-ed functions, ``closed_call`` and ``remat`` are inlined so
the layers inside them are seen, and a ``scan`` of at most ``MAX_UNROLL``
steps whose parameters are all scanned over (stacked layers, as ``nnx.scan``
makes) is unrolled: the layers of different steps are disjoint parts of the
stacked leaf, with orthogonal gradients, so each is ghosted on its own.

The sites are found on the one-example trace; the forward and backward pass
then run on the loss traced at the batch's size with the perturbations added
at the same sites (the user's own batched graph, which XLA compiles as it does
the plain gradient: the vmap of the one-example trace made a small MLP's
backward pass ~18 % slower on CPU). Each site's data operands and output
cotangents are read per example along the axis where the one-example trace
has size 1. Where the two traces do not line up (other sites, no such axis,
e.g. a scan that carries the examples) the vmap of the one-example trace is
used instead.

The loss is traced for one example at a time, so it must not couple examples
(BatchNorm in training mode, losses normalised by batch statistics): a cheap
probe at trace time evaluates the loss on two random batches that differ only
in their first example and refuses the function if any other example's loss
changes. The probe is numerical: a coupling that no random input reveals
goes undetected.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence, cast

import chex
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

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
_HIGHEST = lax.Precision.HIGHEST
# Scans over at most this many steps whose parameters are all scanned over
# (stacked layers, not weights shared by the steps) are unrolled, so each
# step's layers are ghosted; other scans fall back to vmap.
MAX_UNROLL = 64


class _Tag(NamedTuple):
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


_CONST = _Tag()
_DATA = _Tag(data=True)
_ABSENT = object()  # a value the current walk does not compute


@dataclasses.dataclass(frozen=True)
class _Site:
  eqn: Any  # jax.extend.core.JaxprEqn
  in_tags: tuple[_Tag, ...]

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


def _bind(eqn, vals: Sequence[Any]) -> list[Any]:
  params = eqn.primitive.get_bind_params(eqn.params)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*vals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _out_tag(eqn, in_tags: Sequence[_Tag]) -> _Tag:
  """Tag of a non-site equation's outputs."""
  if any(t.data for t in in_tags):
    return _DATA
  leaves = frozenset().union(*(t.leaves for t in in_tags))
  live = [(t, v) for t, v in zip(in_tags, eqn.invars) if t.leaves]
  iso = (len(leaves) == 1 and len(live) == 1 and live[0][0].iso
         and eqn.primitive.name in _ISOMETRIC and len(eqn.outvars) == 1
         and math.prod(live[0][1].aval.shape)
         == math.prod(eqn.outvars[0].aval.shape)
         and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.inexact))
  if not iso:
    return _Tag(leaves=leaves)
  parent, name = live[0][0], eqn.primitive.name
  exact = parent.exact and name in _CASTS
  layout = None
  if parent.layout is not None:
    if name == "transpose" and tuple(eqn.params["permutation"]) == (1, 0):
      layout = 1 - parent.layout
    elif name in _CASTS:
      layout = parent.layout
  return _Tag(leaves=leaves, iso=True, layout=layout, part=parent.part,
              exact=exact)


def _slice_tag(tag: _Tag, i: int, ndim: int) -> _Tag:
  """Tag of ``x[i]`` for x with tag ``tag`` (a scanned-over input)."""
  if not tag.iso:
    return tag
  return _Tag(leaves=tag.leaves, iso=True, part=tag.part + (i,),
              exact=tag.exact, layout=0 if tag.exact and ndim == 2 else None)


def _merge_tags(tags: Sequence[_Tag]) -> _Tag:
  if any(t.data for t in tags):
    return _DATA
  return _Tag(leaves=frozenset().union(*(t.leaves for t in tags)))


class _Walker:
  """Interprets a one-example jaxpr, tracking tags and handling sites.

  mode "discover": tags only, records the sites. "param": computes only
  parameter-only values, records the parameter operands of every site.
  "forward": computes everything, adds ``perts[s]`` to the outputs of site s
  and records its data and constant operands.
  """

  def __init__(self, mode: str, perts: Optional[list] = None):
    self.mode = mode
    self.sites: list[_Site] = []
    self.param_operands: list[list[Any]] = []
    self.data_operands: list[list[Any]] = []
    self.fixed_operands: list[list[Any]] = []
    self._perts = perts
    self._count = 0

  def run(self, jaxpr, consts, args, const_tags, arg_tags):
    env: dict[Any, tuple[Any, _Tag]] = {}

    def read(v):
      if isinstance(v, jex.core.Literal):
        return v.val, _CONST
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
                                  [_CONST] * len(inner_consts), tags)
      elif is_site and _unrollable(eqn, tags):
        outs, out_tags = self._unroll_scan(eqn, vals, tags)
      elif is_site:
        outs = self._site(eqn, vals, tags)
        out_tags = [_DATA] * len(eqn.outvars)
      else:
        tag = _out_tag(eqn, tags)
        computable = all(v is not _ABSENT for v in vals)
        outs = (_bind(eqn, vals) if computable
                else [_ABSENT] * len(eqn.outvars))
        out_tags = [tag] * len(eqn.outvars)
      for v, x, t in zip(eqn.outvars, outs, out_tags):
        env[v] = (x, t)
    outs = [read(v) for v in jaxpr.outvars]
    return [x for x, _ in outs], [t for _, t in outs]

  def _unroll_scan(self, eqn, vals, tags):
    p = eqn.params
    body, nc, nk = p["jaxpr"], p["num_consts"], p["num_carry"]
    carry, carry_tags = list(vals[nc:nc + nk]), list(tags[nc:nc + nk])
    steps = range(p["length"])
    ys = [None] * p["length"]
    for i in (reversed(steps) if p["reverse"] else steps):
      xs = [_ABSENT if x is _ABSENT else x[i] for x in vals[nc + nk:]]
      xs_tags = [_slice_tag(t, i, v.aval.ndim - 1)
                 for t, v in zip(tags[nc + nk:], eqn.invars[nc + nk:])]
      outs, out_tags = self.run(
          body.jaxpr, body.consts, [*vals[:nc], *carry, *xs],
          [_CONST] * len(body.consts), [*tags[:nc], *carry_tags, *xs_tags])
      carry, carry_tags = list(outs[:nk]), list(out_tags[:nk])
      ys[i] = (outs[nk:], out_tags[nk:])
    stacked = [_ABSENT if any(y is _ABSENT for y in col) else jnp.stack(col)
               for col in zip(*(y[0] for y in ys))]
    stacked_tags = [_merge_tags(col) for col in zip(*(y[1] for y in ys))]
    return carry + stacked, carry_tags + stacked_tags

  def _site(self, eqn, vals, tags):
    site = _Site(eqn, tuple(tags))
    self.sites.append(site)
    if self.mode == "param":
      self.param_operands.append([vals[i] for i in site.param_slots])
    if self.mode != "forward":
      return [_ABSENT] * len(eqn.outvars)
    outs = _bind(eqn, vals)
    perts = self._perts[self._count]
    self._count += 1
    outs = [o if p is None else o + p for o, p in zip(outs, perts)]
    self.data_operands.append([vals[i] for i in site.data_slots])
    self.fixed_operands.append([vals[i] for i in site.fixed_slots])
    return outs


def _unrollable(eqn, tags: Sequence[_Tag]) -> bool:
  if eqn.primitive.name != "scan" or eqn.params["length"] > MAX_UNROLL:
    return False
  return not any(t.is_param for t in tags[:eqn.params["num_consts"]])


def _site_inputs(site: _Site, params: Sequence[Any], data: Sequence[Any],
                 fixed: Sequence[Any]) -> list[Any]:
  vals = [v.val if isinstance(v, jex.core.Literal) else None
          for v in site.eqn.invars]
  for slots, xs in ((site.param_slots, params), (site.data_slots, data),
                    (site.fixed_slots, fixed)):
    for i, x in zip(slots, xs):
      vals[i] = x
  return vals


def _local_param_grads(site: _Site, params, data, fixed, deltas) -> list[Any]:
  """One example's gradient w.r.t. a site's parameter operands (its VJP)."""
  def local(p):
    outs = _bind(site.eqn, _site_inputs(site, p, data, fixed))
    return [o for o, keep in zip(outs, site.perturbed) if keep]
  _, vjp = jax.vjp(local, list(params))
  return vjp([d for d, keep in zip(deltas, site.perturbed) if keep])[0]


def _f32(x):
  return x.astype(jnp.float32)


def _gram_or_outer_sq(x: chex.Array, d: chex.Array) -> chex.Array:
  """‖Σ_t x_bt d_btᵀ‖² summed over b, for x (B,T,A), d (B,T,C)."""
  _, t, a = x.shape
  c = d.shape[-1]
  x, d = _f32(x), _f32(d)
  if t * (a + c) <= a * c:
    kx = jnp.einsum("bta,bsa->bts", x, x, precision=_HIGHEST)
    kd = jnp.einsum("btc,bsc->bts", d, d, precision=_HIGHEST)
    return jnp.sum(kx * kd)
  g = jnp.einsum("bta,btc->bac", x, d, precision=_HIGHEST)
  return jnp.sum(g * g)


def _dot_general_dims(site: _Site):
  """(x contracting, x batch, W contracting, W batch) dims of a dense site."""
  (lc, rc), (lb, rb) = site.eqn.params["dimension_numbers"]
  if site.param_slots == (1,):
    return lc, lb, rc, rb
  return rc, rb, lc, lb


def _dot_general_factors(site: _Site, x: chex.Array, delta: chex.Array):
  """x as (B, T, A) and δ as (B, T, C): ∂f/∂W = [x_bᵀ δ_b]_b.

  B are the batch dims shared by x and W (e.g. heads), T the positions (x's
  free dims), A the contracted inputs, C W's free dims (outputs).
  """
  xc, xb, wc, wb = _dot_general_dims(site)
  w_is_rhs = site.param_slots == (1,)
  w_aval = site.eqn.invars[site.param_slots[0]].aval
  x_free = [i for i in range(x.ndim) if i not in xc and i not in xb]
  w_free = [i for i in range(w_aval.ndim) if i not in wc and i not in wb]
  bsz = math.prod(x.shape[i] for i in xb)
  t = math.prod(x.shape[i] for i in x_free)
  a = math.prod(x.shape[i] for i in xc)
  c = math.prod(w_aval.shape[i] for i in w_free)
  xs = jnp.transpose(x, (*xb, *x_free, *xc)).reshape(bsz, t, a)
  # dot_general's output is (batch, lhs free, rhs free).
  nb, nx, nw = len(xb), len(x_free), len(w_free)
  if not w_is_rhs:
    delta = jnp.transpose(delta, (*range(nb), *range(nb + nw, nb + nw + nx),
                                  *range(nb, nb + nw)))
  return xs, delta.reshape(bsz, t, c)


def _dot_general_sq(site: _Site, x: chex.Array, delta: chex.Array) -> chex.Array:
  """Ghost ‖∂f/∂W‖² at ``dot_general(lhs, rhs)`` with W the parameter."""
  return _gram_or_outer_sq(*_dot_general_factors(site, x, delta))


def _is_embedding_gather(site: _Site) -> bool:
  if site.param_slots != (0,) or site.data_slots != (1,):
    return False
  dn = site.eqn.params["dimension_numbers"]
  table = site.eqn.invars[0].aval
  out = site.eqn.outvars[0].aval
  return (table.ndim == 2 and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,)
          and tuple(dn.offset_dims) == (out.ndim - 1,)
          and not dn.operand_batching_dims
          and tuple(site.eqn.params["slice_sizes"]) == (1, table.shape[1]))


class _Tokens(NamedTuple):
  """Rows e_{tok_t} of an embedding gradient, kept as indices (T,)."""
  tok: chex.Array
  valid: chex.Array


def _embedding_factors(site: _Site, indices: chex.Array, delta: chex.Array
                       ) -> tuple[_Tokens, chex.Array]:
  """∂f/∂E = Σ_t e_{tok_t} δ_tᵀ for the lookup E[tok]; δ as (T, width)."""
  vocab, width = site.eqn.invars[0].aval.shape
  tok = indices[..., 0].reshape(-1)
  valid = jnp.ones(tok.shape, bool)
  if site.eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
    valid = (tok >= 0) & (tok < vocab)  # dropped lookups get no gradient
  delta = jnp.where(valid[:, None], _f32(delta).reshape(-1, width), 0.0)
  return _Tokens(jnp.clip(tok, 0, vocab - 1), valid), delta


def _embedding_sq(site: _Site, indices: chex.Array,
                  delta: chex.Array) -> chex.Array:
  """‖∂f/∂E‖² = Σ_{t,t'} [tok_t = tok_t'] δ_t·δ_t'."""
  (tok, _), delta = _embedding_factors(site, indices, delta)
  t = tok.shape[0]
  # Rows of one token add up. Label each position by its token's first
  # position (T² integer compares, cheaper than a sort on CPU for short
  # sequences) or by its run in sorted order, then sum rows per label, O(T d).
  if t <= 512:
    label = jnp.argmax(tok[:, None] == tok[None, :], axis=1)
  else:
    order = jnp.argsort(tok)
    tok, delta = tok[order], delta[order]
    label = jnp.cumsum(jnp.concatenate(
        [jnp.zeros((1,), jnp.int32), (tok[1:] != tok[:-1]).astype(jnp.int32)]))
  rows = jax.ops.segment_sum(delta, label, num_segments=t)
  return jnp.sum(rows * rows)


def _conv_sq(site: _Site, x: chex.Array, delta: chex.Array) -> chex.Array:
  """Ghost ‖∂f/∂K‖² at ``conv_general_dilated(x, K)``.

  With the patches X (positions × inputs) of each feature group, the kernel
  gradient of group g is X_gᵀ Δ_g, a dense layer over output positions.
  """
  p = site.eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  kernel = site.eqn.invars[1].aval
  groups = p["feature_group_count"]
  patches = lax.conv_general_dilated_patches(
      x, [kernel.shape[i] for i in rhs_spec[2:]], p["window_strides"],
      p["padding"], p["lhs_dilation"], p["rhs_dilation"],
      dimension_numbers=p["dimension_numbers"], precision=_HIGHEST)
  # Both in (batch, spatial..., features) order; features are group-major
  # (patch features are channel-major, groups own contiguous channels).
  to_last = lambda a: jnp.transpose(a, (out_spec[0], *out_spec[2:],
                                        out_spec[1]))
  patches = to_last(patches).reshape(-1, groups, patches.shape[out_spec[1]]
                                     // groups)
  delta = to_last(delta).reshape(-1, groups, delta.shape[out_spec[1]] // groups)
  return _gram_or_outer_sq(jnp.swapaxes(patches, 0, 1),
                           jnp.swapaxes(delta, 0, 1))


def _ghost_kind(site: _Site) -> Optional[str]:
  name = site.eqn.primitive.name
  if (name == "conv_general_dilated" and site.param_slots == (1,)
      and site.data_slots == (0,) and site.eqn.params["batch_group_count"] == 1):
    return "conv"
  if name == "dot_general" and len(site.param_slots) == 1 \
      and len(site.data_slots) == 1:
    return "dot_general"
  if name == "gather" and _is_embedding_gather(site):
    return "embedding"
  return None


def _ghost_sq(site: _Site, data: Sequence[Any], delta: chex.Array):
  kind = _ghost_kind(site)
  if kind == "dot_general":
    return _dot_general_sq(site, data[0], delta)
  if kind == "conv":
    return _conv_sq(site, data[0], delta)
  return _embedding_sq(site, data[0], delta)


def _shared_factors(site: _Site, layout: int, data: Sequence[Any],
                    delta: chex.Array):
  """A site's ∂f/∂W as Σ_t r_t c_tᵀ in the 2-D leaf's own axes: (r, c)."""
  if _ghost_kind(site) == "embedding":
    return _embedding_factors(site, data[0], delta)
  xs, ds = _dot_general_factors(site, data[0], delta)
  xs, ds = _f32(xs[0]), _f32(ds[0])
  (w_contracted,) = _dot_general_dims(site)[2]
  # The leaf's axis 0 is the site operand's axis `layout`.
  return (xs, ds) if w_contracted == layout else (ds, xs)


def _factor_gram(a, b) -> chex.Array:
  """[⟨a_t, b_s⟩]_{t,s} for factors given densely (T, D) or as _Tokens."""
  if isinstance(a, _Tokens) and isinstance(b, _Tokens):
    return ((a.tok[:, None] == b.tok[None, :]) & a.valid[:, None]
            & b.valid[None, :]).astype(jnp.float32)
  if isinstance(b, _Tokens):
    return _factor_gram(b, a).T
  if isinstance(a, _Tokens):  # ⟨e_tok, b_s⟩ = b_s[tok]
    return jnp.where(a.valid[:, None], b[:, a.tok].T, 0.0)
  return jnp.einsum("td,sd->ts", a, b, precision=_HIGHEST)


def _shared_sq(sites: Sequence[_Site], group: tuple[int, ...],
               layouts: tuple[int, ...], data: Sequence[Any],
               deltas: Sequence[Any]) -> chex.Array:
  """‖Σ_s Σ_t r_st c_stᵀ‖² for a 2-D weight used at several sites (tied):
  Σ over pairs of sites of Σ_{t,t'} ⟨r_st, r_s't'⟩ ⟨c_st, c_s't'⟩."""
  factors = [_shared_factors(sites[s], layout, data[s], deltas[s][0])
             for s, layout in zip(group, layouts)]
  return sum(jnp.sum(_factor_gram(ra, rb) * _factor_gram(ca, cb))
             for ra, ca in factors for rb, cb in factors)


def _positions(site: _Site) -> int:
  """T of a site that qualifies for the shared (tied) Gram form, else 0."""
  kind = _ghost_kind(site)
  if kind == "embedding":
    return math.prod(site.eqn.invars[1].aval.shape[:-1])
  if kind != "dot_general":
    return 0
  xc, xb, wc, wb = _dot_general_dims(site)
  x = site.eqn.invars[site.data_slots[0]].aval
  if xb or wb or len(wc) != 1:
    return 0
  return math.prod(x.shape) // x.shape[xc[0]]


class _Plan(NamedTuple):
  ghost: tuple[int, ...]  # sites whose single parameter operand is ghosted
  # 2-D leaves used at several sites (tied): (sites, each one's layout).
  shared: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
  pulled: tuple[tuple[int, int], ...]  # (site, operand) formed and pulled back


def _plan(sites: Sequence[_Site]) -> _Plan:
  part_uses: dict[tuple[int, tuple], list[tuple[int, int]]] = {}
  for s, site in enumerate(sites):
    for j, slot in enumerate(site.param_slots):
      tag = site.in_tags[slot]
      for leaf in tag.leaves:
        part_uses.setdefault((leaf, tag.part), []).append((s, j))
  # Disjoint parts of a leaf (e.g. the layers of an unrolled scan) have
  # orthogonal gradients, so each is a unit of its own; if one part contains
  # another, the whole leaf is one unit.
  parts: dict[int, list[tuple]] = {}
  for leaf, part in part_uses:
    parts.setdefault(leaf, []).append(part)
  uses: dict[tuple[int, tuple], list[tuple[int, int]]] = {}
  for (leaf, part), unit_uses in part_uses.items():
    nested = any(a != b and a[:len(b)] == b for a in parts[leaf]
                 for b in parts[leaf])
    uses.setdefault((leaf, () if nested else part), []).extend(unit_uses)
  ghost, shared, covered = [], [], set()
  for leaf_uses in uses.values():
    tags = [sites[s].in_tags[sites[s].param_slots[j]] for s, j in leaf_uses]
    if not all(t.iso and _ghost_kind(sites[s]) for t, (s, _) in
               zip(tags, leaf_uses)):
      continue
    if len(leaf_uses) == 1:
      ghost.append(leaf_uses[0][0])
      covered.add(leaf_uses[0][0])
      continue
    group = tuple(s for s, _ in leaf_uses)
    layouts = tuple(t.layout for t in tags)
    embedding_ok = all(l == 0 for s, l in zip(group, layouts)
                       if _ghost_kind(sites[s]) == "embedding")
    if (None in layouts or len({t.part for t in tags}) > 1 or not embedding_ok
        or not all(_positions(sites[s]) for s in group)):
      continue
    positions = sum(_positions(sites[s]) for s in group)
    rows, cols = sites[group[0]].eqn.invars[
        sites[group[0]].param_slots[0]].aval.shape
    if positions * (rows + cols) <= rows * cols:  # the Gram form is cheaper
      shared.append((group, cast(tuple[int, ...], layouts)))  # no None: checked
      covered.update(group)
  pulled = tuple((s, j) for s, site in enumerate(sites) if s not in covered
                 for j in range(len(site.param_slots)))
  return _Plan(tuple(sorted(ghost)), tuple(shared), pulled)


def _warn_higher_order(sites: Sequence[_Site], plan: _Plan,
                       names: Sequence[str]) -> None:
  by_prim: dict[str, set[str]] = {}
  for s, _ in plan.pulled:
    site = sites[s]
    if any(True for _ in jex.core.jaxprs_in_params(site.eqn.params)):
      leaves = frozenset().union(*(site.in_tags[i].leaves
                                   for i in site.param_slots))
      by_prim.setdefault(site.eqn.primitive.name, set()).update(
          names[i] for i in leaves)
  for prim, leaf_names in sorted(by_prim.items()):
    warnings.warn(
        f"ghost norms: parameters {sorted(leaf_names)} are used inside "
        f"`{prim}`; their per-example gradients are computed by vmap over that "
        "operation's VJP (exact, but memory m × their size). Ghost norms see "
        "inside jit, closed_call, remat and scans of at most "
        f"{MAX_UNROLL} steps over stacked (not shared) weights.", stacklevel=4)


def _random_like(rng: np.random.Generator, shape, dtype) -> np.ndarray:
  if jnp.issubdtype(dtype, jnp.inexact):
    return (0.5 * rng.standard_normal(shape)).astype(dtype)
  if jnp.issubdtype(dtype, jnp.bool_):
    return rng.integers(0, 2, shape).astype(bool)
  return rng.integers(0, 2, shape).astype(dtype)


def check_separable(loss_fn: Callable[[PyTree, PyTree], chex.Array],
                    params: PyTree, batch: PyTree) -> None:
  """Refuses a loss in which one example's loss depends on another example.

  Evaluates ``loss_fn`` (at trace time, on random parameters and three random
  examples shaped like ``batch``'s) twice, changing only the first example;
  raises ``ValueError`` if the losses of the others change. A ``loss_fn`` that
  closes over values traced by an enclosing ``jit`` cannot be evaluated
  eagerly and is not checked.
  """
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    p = jax.tree.map(lambda x: _random_like(rng, x.shape, x.dtype), params)
    b = jax.tree.map(
        lambda x: _random_like(rng, (3,) + x.shape[1:], x.dtype), batch)
    b2 = jax.tree.map(
        lambda x: np.concatenate(
            [_random_like(rng, (1,) + x.shape[1:], x.dtype), x[1:]]), b)
    before, after = loss_fn(p, b), loss_fn(p, b2)
  if isinstance(before, jax.core.Tracer):
    return  # loss_fn closes over traced values: it cannot be probed here
  before = np.asarray(before, np.float64)[1:]
  after = np.asarray(after, np.float64)[1:]
  if not np.allclose(before, after, rtol=1e-5, atol=1e-6, equal_nan=True):
    raise ValueError(
        "loss_fn couples examples: changing example 0 of a batch changed the "
        f"losses of the others ({before} -> {after}). Per-example gradients "
        "are undefined for such a loss (BatchNorm in training mode, "
        "normalisation by batch statistics, ...); use per-example "
        "normalisation (LayerNorm/GroupNorm) or BatchNorm in inference mode.")


def _pulled_back_sq(sites, pulled, site_params, p_leaves, data_ops, fixed_ops,
                    deltas) -> chex.Array:
  """Σ over the leaves involved of ‖J_hᵀ Σ_s G_{s,k}‖², per example k.

  G_{s,k} is site s's local per-example gradient w.r.t. its parameter operands
  and h maps the parameter leaves to those operands; all uses of a leaf are
  summed before the norm, so tied weights are exact.
  """
  involved = sorted(frozenset().union(*(
      sites[s].in_tags[sites[s].param_slots[j]].leaves for s, j in pulled)))

  def operands_of(sub):
    pl = list(p_leaves)
    for i, x in zip(involved, sub):
      pl[i] = x
    ops = site_params(pl)
    return [ops[s][j] for s, j in pulled]

  values, pull_back = jax.vjp(operands_of, [p_leaves[i] for i in involved])
  # `pulled` lists every operand of each of its sites, in order.
  operands: dict[int, list[Any]] = {}
  for (s, _), value in zip(pulled, values):
    operands.setdefault(s, []).append(value)

  def per_example(data_k, deltas_k):
    local = {s: _local_param_grads(sites[s], ops, data_k[s], fixed_ops[s],
                                   deltas_k[s])
             for s, ops in operands.items()}
    (grads,) = pull_back([local[s][j] for s, j in pulled])
    return sum(jnp.sum(jnp.square(_f32(g))) for g in grads)

  return jax.vmap(per_example)(data_ops, deltas)


def _batch_axis(example: tuple[int, ...], batch: tuple[int, ...], m: int
                ) -> Optional[int]:
  """The axis that holds the m examples in ``batch``, where the one-example
  trace has size 1 (-1: m = 1, the same shape); None if there is none."""
  if example == batch:
    return -1 if m == 1 else None
  diff = [i for i, (a, b) in enumerate(zip(example, batch)) if a != b]
  if len(example) != len(batch) or len(diff) != 1:
    return None
  return diff[0] if (example[diff[0]], batch[diff[0]]) == (1, m) else None


def _to_examples(x: chex.Array, axis: int) -> chex.Array:
  """A batched value → (m,) + the one-example trace's shape of it."""
  return x[None] if axis == -1 else jnp.expand_dims(jnp.moveaxis(x, axis, 0), axis + 1)


def _batched_trace(loss_fn, p_def, b_def, p_leaves, b_leaves, sites, arg_tags):
  """The loss traced at the batch's size, if it has the same sites as the
  one-example trace with the examples along one axis of every data operand
  and site output (and fixed operands of the same shape); else None.

  Returns (jaxpr, consts, sites, data_axes, out_axes).
  """
  m = b_leaves[0].shape[0]
  try:
    closed = jax.make_jaxpr(
        lambda pl, bl: loss_fn(p_def.unflatten(pl), b_def.unflatten(bl)))(
            p_leaves, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in b_leaves])
  except Exception:  # pylint: disable=broad-except
    return None  # e.g. a loss that only traces at batch size 1
  if [v.aval.shape for v in closed.jaxpr.outvars] != [(m,)]:
    return None
  walker = _Walker("discover")
  walker.run(closed.jaxpr, [_ABSENT] * len(closed.consts),
             [_ABSENT] * len(arg_tags), [_CONST] * len(closed.consts), arg_tags)
  bsites = walker.sites
  if len(bsites) != len(sites):
    return None
  data_axes, out_axes = [], []
  shape = lambda v: tuple(v.aval.shape)
  for site, bsite in zip(sites, bsites):
    if (site.eqn.primitive != bsite.eqn.primitive or site.in_tags != bsite.in_tags
        or any(shape(site.eqn.invars[i]) != shape(bsite.eqn.invars[i])
               for i in site.fixed_slots + site.param_slots)):
      return None
    axes = [[_batch_axis(shape(a), shape(b), m) for a, b in pairs] for pairs in (
        [(site.eqn.invars[i], bsite.eqn.invars[i]) for i in site.data_slots],
        list(zip(site.eqn.outvars, bsite.eqn.outvars)))]
    if any(a is None for a in axes[0] + axes[1]):
      return None
    data_axes.append(axes[0])
    out_axes.append(axes[1])
  return closed.jaxpr, closed.consts, bsites, data_axes, out_axes


def value_grad_and_norms(loss_fn: Callable[[PyTree, PyTree], chex.Array],
                         params: PyTree, batch: PyTree,
                         weights: chex.Array, *, separable_check: bool = True
                         ) -> tuple[chex.Array, PyTree, chex.Array]:
  """Losses, ∇ Σ_k weights_k f_k and exact ‖∇f_k‖, from one backward pass.

  See the module docstring for the method. ``weights`` (m,) must be nonzero
  where a norm is wanted: the norms are recovered from the weighted backward
  pass as ‖∇(w_k f_k)‖ / |w_k| (NaN where w_k = 0).
  """
  p_leaves, p_def = jax.tree.flatten(params)
  b_leaves, b_def = jax.tree.flatten(batch)
  m = b_leaves[0].shape[0]
  if separable_check:
    check_separable(loss_fn, params, batch)
  names = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]

  def one(pl, bl):
    return loss_fn(p_def.unflatten(pl), b_def.unflatten(bl))[0]

  example = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
             for x in b_leaves]
  closed = jax.make_jaxpr(one)(p_leaves, example)
  jaxpr, consts = closed.jaxpr, closed.consts
  p_tags = [_Tag(leaves=frozenset([i]), iso=True, exact=True,
                 layout=0 if x.ndim == 2 else None)
            if jnp.issubdtype(x.dtype, jnp.inexact) else _CONST
            for i, x in enumerate(p_leaves)]
  arg_tags = p_tags + [_DATA] * len(b_leaves)
  const_tags = [_CONST] * len(consts)

  discover = _Walker("discover")
  _, (out_tag,) = discover.run(jaxpr, [_ABSENT] * len(consts),
                               [_ABSENT] * len(arg_tags), const_tags, arg_tags)
  if not out_tag.data:
    raise ValueError("loss_fn's per-example loss does not depend on the batch.")
  sites = discover.sites
  plan = _plan(sites)
  _warn_higher_order(sites, plan, names)

  batched = _batched_trace(loss_fn, p_def, b_def, p_leaves, b_leaves, sites,
                           arg_tags)
  if batched is not None:
    # The user's own batched graph with the perturbations added: XLA compiles
    # it as it compiles the plain gradient (the vmap of the one-example trace
    # below adds a size-1 axis to every layer, and ~18 % to a small MLP's
    # backward pass on CPU).
    bjaxpr, bconsts, bsites, data_axes, out_axes = batched

    def forward_batched(pl, perts):
      walker = _Walker("forward", perts)
      (loss,), _ = walker.run(bjaxpr, bconsts, [*pl, *b_leaves],
                              [_CONST] * len(bconsts), arg_tags)
      return loss, (walker.data_operands, walker.fixed_operands)

    perts = [[jnp.zeros(v.aval.shape, v.aval.dtype) if keep else None
              for v, keep in zip(bsite.eqn.outvars, site.perturbed)]
             for site, bsite in zip(sites, bsites)]
    losses, backward, (data_ops, fixed_ops) = jax.vjp(
        forward_batched, p_leaves, perts, has_aux=True)
    grad_leaves, deltas = backward(weights.astype(losses.dtype))
    # Per example, in the layout of the one-example trace: (m,) + its shape.
    data_ops = [[_to_examples(x, a) for x, a in zip(ops, axes)]
                for ops, axes in zip(data_ops, data_axes)]
    deltas = [[None if d is None else _to_examples(d, a) for d, a in zip(ds, axes)]
              for ds, axes in zip(deltas, out_axes)]
  else:
    def forward(pl, perts, bl):
      walker = _Walker("forward", perts)
      (loss,), _ = walker.run(jaxpr, consts, [*pl, *(x[None] for x in bl)],
                              const_tags, arg_tags)
      return loss, (walker.data_operands, walker.fixed_operands)

    perts = [[jnp.zeros((m,) + v.aval.shape, v.aval.dtype) if keep else None
              for v, keep in zip(site.eqn.outvars, site.perturbed)]
             for site in sites]
    vmapped = jax.vmap(forward, in_axes=(None, 0, 0), out_axes=(0, (0, None)))
    losses, backward, (data_ops, fixed_ops) = jax.vjp(
        lambda pl, pt: vmapped(pl, pt, b_leaves), p_leaves, perts, has_aux=True)
    grad_leaves, deltas = backward(weights.astype(losses.dtype))

  def site_params(pl):
    walker = _Walker("param")
    walker.run(jaxpr, consts, [*pl, *[_ABSENT] * len(b_leaves)], const_tags,
               arg_tags)
    return walker.param_operands

  sq = jnp.zeros((m,), jnp.float32)
  for s in plan.ghost:
    delta = deltas[s][0]
    sq += jax.vmap(lambda d, x: _ghost_sq(sites[s], x, d))(delta, data_ops[s])
  for group, layouts in plan.shared:
    sq += jax.vmap(lambda dt, d: _shared_sq(sites, group, layouts, dt, d))(
        data_ops, deltas)
  if plan.pulled:
    sq += _pulled_back_sq(sites, plan.pulled, site_params, p_leaves, data_ops,
                          fixed_ops, deltas)
  norms = jnp.sqrt(sq) / jnp.abs(weights).astype(jnp.float32)
  return losses, jax.tree.unflatten(p_def, grad_leaves), norms
