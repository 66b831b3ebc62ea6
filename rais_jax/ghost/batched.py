"""The loss traced at the batch's size, aligned with the one-example trace.

The sites are found on the one-example trace; the forward and backward pass
then run on the loss traced at the batch's size (the user's own batched
graph, which XLA compiles as it does the plain gradient: the vmap of the
one-example trace made a small MLP's backward pass ~18 % slower on CPU).
Each site's data operands and output cotangents are read per example along
the axis where the one-example trace has size 1. Where the two traces do not
line up (other sites, no such axis, e.g. a scan that carries the examples)
:func:`batched_trace` returns None and the caller vmaps the one-example trace.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from rais_jax.ghost.walker import ABSENT, CONST, Walker


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


def to_examples(x: chex.Array, axis: int) -> chex.Array:
  """A batched value → (m,) + the one-example trace's shape of it."""
  return x[None] if axis == -1 else jnp.expand_dims(jnp.moveaxis(x, axis, 0), axis + 1)


def batched_trace(loss_fn, p_def, b_def, p_leaves, b_leaves, sites, arg_tags, *,
                  has_aux: bool = False):
  """The loss traced at the batch's size, if it has the same sites as the
  one-example trace with the examples along one axis of every data operand
  and site output (and fixed operands of the same shape); else None.

  Returns (jaxpr, consts, sites, data_axes, out_axes, the treedef of the
  aux outputs or None). With ``has_aux`` the jaxpr's outputs are the losses
  then the aux leaves.
  """
  m = b_leaves[0].shape[0]
  aux_def = []

  def flat(pl, bl):
    out = loss_fn(p_def.unflatten(pl), b_def.unflatten(bl))
    if not has_aux:
      return [out]
    aux, tree = jax.tree.flatten(out[1])
    aux_def.append(tree)
    return [out[0], *aux]

  try:
    closed = jax.make_jaxpr(flat)(
        p_leaves, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in b_leaves])
  except Exception:  # pylint: disable=broad-except
    return None  # e.g. a loss that only traces at batch size 1
  if closed.jaxpr.outvars[0].aval.shape != (m,):
    return None
  walker = Walker("discover")
  walker.run(closed.jaxpr, [ABSENT] * len(closed.consts),
             [ABSENT] * len(arg_tags), [CONST] * len(closed.consts), arg_tags)
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
  return (closed.jaxpr, closed.consts, bsites, data_axes, out_axes,
          aux_def[0] if has_aux else None)
