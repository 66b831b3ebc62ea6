"""The one forward and backward pass that yields losses, gradient and norms.

The sites of the one-example trace (:mod:`~rais_jax.ghost.walker`) get a zero
perturbation added to their outputs; one backward pass of the weighted loss
w.r.t. the parameters and the perturbations gives the gradient and every
site's output cotangent δ. The plan (:mod:`~rais_jax.ghost.plan`) then sums
each example's squared norm over the kernels (:mod:`~rais_jax.ghost.kernels`)
and the pull-back (:mod:`~rais_jax.ghost.pullback`).
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from rais_jax.ghost import batched as batched_lib
from rais_jax.ghost.kernels import shared_sq, site_sq
from rais_jax.ghost.plan import make_plan, warn_higher_order
from rais_jax.ghost.pullback import pulled_back_sq
from rais_jax.ghost.walker import ABSENT, CONST, DATA, Tag, Walker

PyTree = Any


def value_grad_and_norms(loss_fn: Callable[[PyTree, PyTree], Any],
                         params: PyTree, batch: PyTree,
                         weights: chex.Array, *, has_aux: bool = False,
                         coupled: bool = False) -> tuple:
  """Losses, ∇ Σ_k weights_k f_k and exact ‖∇f_k‖, from one backward pass.

  See :mod:`rais_jax.ghost` for the method. ``weights`` (m,) must be nonzero
  where a norm is wanted: the norms are recovered from the weighted backward
  pass as ‖∇(w_k f_k)‖ / |w_k| (NaN where w_k = 0). The loss must be
  separable (each example's loss reads only its example); this function does
  not check it: :func:`rais_jax.value_grad_and_norms` does
  (:func:`rais_jax.separability.check_separable`).

  ``has_aux``: ``loss_fn`` returns (losses, aux); aux is returned last.
  ``coupled``: the loss couples the examples of a batch (BatchNorm in
  training mode): the gradient is the batched graph's, and each norm is the
  example's share of it (its rows of every site's input and output
  cotangent, divided by |w_k|; see :mod:`rais_jax.model`). Only the loss
  traced at the batch's size gives the shares: if it does not line up with
  the one-example trace, a ``ValueError`` says so.
  """
  p_leaves, p_def = jax.tree.flatten(params)
  b_leaves, b_def = jax.tree.flatten(batch)
  m = b_leaves[0].shape[0]
  names = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  losses_of = (lambda out: out[0]) if has_aux else (lambda out: out)

  def one(pl, bl):
    return losses_of(loss_fn(p_def.unflatten(pl), b_def.unflatten(bl)))[0]

  example = [jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype)
             for x in b_leaves]
  closed = jax.make_jaxpr(one)(p_leaves, example)
  jaxpr, consts = closed.jaxpr, closed.consts
  p_tags = [Tag(leaves=frozenset([i]), iso=True, exact=True,
                 layout=0 if x.ndim == 2 else None)
            if jnp.issubdtype(x.dtype, jnp.inexact) else CONST
            for i, x in enumerate(p_leaves)]
  arg_tags = p_tags + [DATA] * len(b_leaves)
  const_tags = [CONST] * len(consts)

  discover = Walker("discover")
  _, (out_tag,) = discover.run(jaxpr, [ABSENT] * len(consts),
                               [ABSENT] * len(arg_tags), const_tags, arg_tags)
  if not out_tag.data:
    raise ValueError("loss_fn's per-example loss does not depend on the batch.")
  sites = discover.sites
  plan = make_plan(sites)
  warn_higher_order(sites, plan, names)

  batched = batched_lib.batched_trace(loss_fn, p_def, b_def, p_leaves, b_leaves, sites,
                           arg_tags, has_aux=has_aux)
  if batched is not None:
    passed = _backward_batched(batched, sites, p_leaves, b_leaves, arg_tags, weights)
  elif coupled:
    raise ValueError(
        "ghost norms of a loss that couples the examples of a batch (BatchNorm "
        "in training mode) need the loss traced at the batch's size to line up "
        "with the one-example trace, and it does not: every parameter must "
        "meet values that have one row per example (e.g. a BatchNorm that "
        "multiplies its scale into the normalised input, as "
        "rais_jax.experiments.models.BatchNorm does, not into the batch's "
        "variance first, as flax.nnx.BatchNorm does). Use such a model, or "
        "train it with U-SGD.")
  else:
    passed = _backward_vmapped(jaxpr, consts, const_tags, arg_tags, sites, m,
                               p_leaves, b_leaves, weights)
    if has_aux:  # the vmapped trace has no batch-level outputs: one more forward
      passed = passed + (loss_fn(params, batch)[1],)
  losses, grad_leaves, data_ops, fixed_ops, deltas, *aux = passed

  def site_params(pl):
    walker = Walker("param")
    walker.run(jaxpr, consts, [*pl, *[ABSENT] * len(b_leaves)], const_tags,
               arg_tags)
    return walker.param_operands

  sq = jnp.zeros((m,), jnp.float32)
  for s in plan.ghost:
    delta = deltas[s][0]
    sq += jax.vmap(lambda d, x: site_sq(sites[s], x, d))(delta, data_ops[s])
  for group, layouts in plan.shared:
    sq += jax.vmap(lambda dt, d: shared_sq(sites, group, layouts, dt, d))(
        data_ops, deltas)
  if plan.pulled:
    sq += pulled_back_sq(sites, plan.pulled, site_params, p_leaves, data_ops,
                          fixed_ops, deltas)
  norms = jnp.sqrt(sq) / jnp.abs(weights).astype(jnp.float32)
  return (losses, jax.tree.unflatten(p_def, grad_leaves), norms, *aux)


def _backward_batched(batched, sites, p_leaves, b_leaves, arg_tags, weights):
  """The user's own batched graph with the perturbations added: XLA compiles
  it as it compiles the plain gradient (the vmap of the one-example trace,
  :func:`_backward_vmapped`, adds a size-1 axis to every layer, and ~18 % to a
  small MLP's backward pass on CPU). Returns (losses, gradient leaves, data
  operands, fixed operands, deltas), per example in the layout of the
  one-example trace."""
  bjaxpr, bconsts, bsites, data_axes, out_axes, aux_def = batched

  def forward_batched(pl, perts):
    walker = Walker("forward", perts)
    (loss, *aux), _ = walker.run(bjaxpr, bconsts, [*pl, *b_leaves],
                                 [CONST] * len(bconsts), arg_tags)
    return loss, (walker.data_operands, walker.fixed_operands, aux)

  perts = [[jnp.zeros(v.aval.shape, v.aval.dtype) if keep else None
            for v, keep in zip(bsite.eqn.outvars, site.perturbed)]
           for site, bsite in zip(sites, bsites)]
  losses, backward, (data_ops, fixed_ops, aux) = jax.vjp(
      forward_batched, p_leaves, perts, has_aux=True)
  grad_leaves, deltas = backward(weights.astype(losses.dtype))
  # Per example, in the layout of the one-example trace: (m,) + its shape.
  data_ops = [[batched_lib.to_examples(x, a) for x, a in zip(ops, axes)]
              for ops, axes in zip(data_ops, data_axes)]
  deltas = [[None if d is None else batched_lib.to_examples(d, a) for d, a in zip(ds, axes)]
            for ds, axes in zip(deltas, out_axes)]
  out = (losses, grad_leaves, data_ops, fixed_ops, deltas)
  return out if aux_def is None else out + (jax.tree.unflatten(aux_def, aux),)


def _backward_vmapped(jaxpr, consts, const_tags, arg_tags, sites, m, p_leaves,
                      b_leaves, weights):
  """The one-example trace with its perturbations, vmapped over the batch
  (where the batched graph could not be traced); returns what
  :func:`_backward_batched` does."""
  def forward(pl, perts, bl):
    walker = Walker("forward", perts)
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
  return losses, grad_leaves, data_ops, fixed_ops, deltas
