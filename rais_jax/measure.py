"""The minibatch gradient with per-example norms, and passes over all the data.

:func:`measured_gradient` is what a training step computes: the
importance-weighted minibatch gradient g_R = (1/m) Σ_k w_k ∇f_k, the
per-example losses, and the per-example gradient norms u_k measured as asked
(exact ones from :func:`rais_jax.value_grad_and_norms`, or the softmax-logit
proxy from the same backward pass, split in two halves for the scale-free
gain ratio). :func:`all_exact_norms` and :func:`full_gradient` pass over all n
examples in chunks (the O-SGD oracle, the exact gain ratio).

The model is given as ``model_fn(params, batch) -> outputs`` and
``loss_head(outputs, batch) -> (m,)`` per-example losses; their composition is
the ``loss_fn(params, batch)`` that the rest of the library takes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from rais_jax import ghost
from rais_jax import norms as norms_lib
from rais_jax.model import ModelFn, StatefulModel, training_loss

PyTree = Any
LossHead = Callable[[chex.Array, PyTree], chex.Array]


def loss_fn_of(model_fn: ModelFn, loss_head: LossHead
               ) -> Callable[[PyTree, PyTree], chex.Array]:
  """``loss_fn(params, batch) -> (m,)``: ``loss_head`` after ``model_fn``."""
  return lambda params, batch: loss_head(model_fn(params, batch), batch)


def _chunks(data: PyTree, chunk_size: int) -> tuple[PyTree, chex.Array]:
  """All n examples as (chunks, chunk_size, ...), the last chunk padded by
  wrapping around, and which rows are real (not padding)."""
  n = norms_lib.batch_size_of(data)
  chunk_size = min(chunk_size, n)
  index = jnp.arange(-(-n // chunk_size) * chunk_size)
  # jnp.asarray: NumPy arrays closed over by a jitted caller cannot be
  # indexed by a traced index.
  chunks = jax.tree.map(
      lambda x: jnp.asarray(x)[index % n].reshape((-1, chunk_size) + x.shape[1:]),
      data)
  return chunks, (index < n).reshape(-1, chunk_size)


def chunked_map(fn: Callable[[PyTree], PyTree], data: PyTree,
                 chunk_size: int) -> PyTree:
  """``fn`` over all n examples in chunks (padded by wrapping), outputs (n, ...)."""
  n = norms_lib.batch_size_of(data)
  out = jax.lax.map(fn, _chunks(data, chunk_size)[0])
  return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


def _weighted_loss(model_fn: ModelFn, loss_head: LossHead, params: PyTree,
                   shift: Optional[chex.Array], batch: PyTree, weights: chex.Array):
  """(Σ_k w_k f_k / m, the m losses); ``shift`` (if any) is added to the
  outputs, to differentiate with respect to them."""
  outputs = model_fn(params, batch)
  if shift is not None:  # (XLA keeps an added 0.0: it is not a no-op for -0.0)
    outputs = outputs + shift
  losses = loss_head(outputs, batch)
  return jnp.sum(weights * losses) / weights.shape[0], losses


def _proxy_gradient(model_fn: ModelFn, loss_head: LossHead, params: PyTree,
                    batch: PyTree, weights: chex.Array):
  """Gradient, proxy norms and ⟨g_A, g_B⟩ from one batched backward pass."""
  m = weights.shape[0]
  halves = jax.tree.map(lambda x: x.reshape((2, m // 2) + x.shape[1:]), batch)
  out_shape = jax.eval_shape(model_fn, params, batch)
  shift = jnp.zeros((2, m // 2) + out_shape.shape[1:], out_shape.dtype)
  grad_fn = jax.grad(functools.partial(_weighted_loss, model_fn, loss_head),
                     argnums=(0, 1), has_aux=True)
  (g2, shift_grads), losses = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0))(
      params, shift, halves, weights.reshape(2, m // 2))
  # Each half's loss was divided by m/2, not m: halve, then sum the halves.
  grads = jax.tree.map(lambda g: 0.5 * (g[0] + g[1]), g2)
  # Each half's mean gradient is g2[i]; their inner product is unbiased for
  # ‖∇F‖² because the halves are independent draws.
  inner = sum(jnp.vdot(g[0], g[1]) for g in jax.tree.leaves(g2))
  # ∂(Σ w f / (m/2))/∂z_k = (2 w_k/m) ∂f_k/∂z_k.
  u = jnp.linalg.norm(shift_grads.reshape(m, -1), axis=-1) * (m / 2) / weights
  return grads, u, inner, losses.reshape(m)


def measured_gradient(model_fn: ModelFn, loss_head: LossHead, params: PyTree,
                      batch: PyTree, weights: chex.Array, *, norms: Optional[str],
                      exact_method: str = "ghost"):
  """g_R = (1/m) Σ_k w_k ∇f_k with the per-example norms u_k, measured as asked.

  Returns (grads, u, ⟨g_A, g_B⟩ or None, losses). ``norms``: ``"proxy"``
  (‖∂f_k/∂outputs_k‖ from the same backward pass, split in two halves for the
  scale-free gain ratio), ``"exact"`` (ghost or vmap norms from
  :func:`rais_jax.value_grad_and_norms`) or None (u = 0). An example whose
  loss is not finite gets u_k = NaN (a broken example: the sampler skips and
  counts it), even where its gradient norm happens to be finite.
  """
  m = weights.shape[0]
  inner = None
  if norms == "proxy":
    grads, u, inner, losses = _proxy_gradient(model_fn, loss_head, params, batch,
                                              weights)
  elif norms == "exact":
    loss_fn = lambda p, b: loss_head(model_fn(p, b), b)
    losses, grads, u = norms_lib.value_grad_and_norms(
        loss_fn, params, batch, weights=weights / m, method=exact_method)
  else:
    (_, losses), grads = jax.value_and_grad(
        lambda p: _weighted_loss(model_fn, loss_head, p, None, batch, weights),
        has_aux=True)(params)
    u = jnp.zeros((m,), jnp.float32)
  u = jnp.where(jnp.isfinite(losses), u, jnp.nan)
  return grads, u, inner, losses


def _proxy_gradient_stateful(model: StatefulModel, loss_head: LossHead,
                             params: PyTree, model_state: PyTree,
                             key: chex.PRNGKey, batch: PyTree, weights: chex.Array,
                             *, halves: bool):
  """Gradient, proxy norms, ⟨g_A, g_B⟩ (or None) and the new state from one
  forward pass of the whole batch in training mode (half batches would
  change BatchNorm's statistics). ``halves``: the backward pass runs twice
  (vmapped), with the cotangents of each half, for ⟨g_A, g_B⟩."""
  m = weights.shape[0]
  out_shape = jax.eval_shape(
      lambda p: model.apply(p, model_state, batch, key, True)[0], params)
  shift = jnp.zeros(out_shape.shape, out_shape.dtype)

  def weighted(p, z):
    outputs, new_state = model.apply(p, model_state, batch, key, True)
    # (XLA keeps an added 0.0: it is not a no-op for -0.0.)
    losses = loss_head(outputs + z, batch)
    return losses, new_state

  losses, backward, new_state = jax.vjp(weighted, params, shift, has_aux=True)
  w = (weights / m).astype(losses.dtype)
  if halves:
    masks = (jnp.arange(m) < m // 2)[None] == jnp.array([True, False])[:, None]
    half_grads, half_shifts = jax.vmap(backward)(jnp.where(masks, w, 0))
    grads = jax.tree.map(lambda g: g[0] + g[1], half_grads)
    shift_grad = half_shifts[0] + half_shifts[1]
    # Each half's mean gradient is twice its share of the sum; the halves are
    # independent draws, so their inner product is unbiased for ‖∇F‖².
    inner = 4 * sum(jnp.vdot(g[0], g[1]) for g in jax.tree.leaves(half_grads))
  else:
    grads, shift_grad = backward(w)
    inner = None
  # ∂(Σ w f / m)/∂z_k = (w_k/m) ∂f_k/∂z_k.
  u = jnp.linalg.norm(shift_grad.reshape(m, -1), axis=-1) * m / weights
  return grads, u, inner, losses, new_state


def measured_gradient_stateful(
    model: StatefulModel, loss_head: LossHead, params: PyTree, model_state: PyTree,
    key: chex.PRNGKey, batch: PyTree, weights: chex.Array, *, norms: Optional[str],
    exact_method: str = "ghost", coupled: bool = False):
  """:func:`measured_gradient` of a :class:`~rais_jax.StatefulModel` in
  training mode (with ``key``); returns (grads, u, ⟨g_A, g_B⟩ or None,
  losses, the new model state). ``coupled``: the loss couples the batch's
  examples (exact norms are then their shares of the gradient, ghost only;
  see :mod:`rais_jax.model`; proxy norms need no ⟨g_A, g_B⟩, since the gain
  ratio of a coupled loss is the ratio of the norms' moments,
  :mod:`rais_jax.gain_ratio`). The separability check is the caller's
  (:meth:`rais_jax.step.StepSpec.check`)."""
  m = weights.shape[0]
  loss_aux = training_loss(model, loss_head, model_state, key)
  inner = None
  if norms == "proxy":
    grads, u, inner, losses, new_state = _proxy_gradient_stateful(
        model, loss_head, params, model_state, key, batch, weights,
        halves=not coupled)
  elif norms == "exact" and exact_method == "ghost":
    losses, grads, u, new_state = ghost.value_grad_and_norms(
        loss_aux, params, batch, weights / m, has_aux=True, coupled=coupled)
  else:
    losses, backward, new_state = jax.vjp(lambda p: loss_aux(p, batch), params,
                                          has_aux=True)
    (grads,) = backward((weights / m).astype(losses.dtype))
    u = (norms_lib.per_example_grad_norms(
        lambda p, b: loss_aux(p, b)[0], params, batch, method="vmap",
        separable_check=False) if norms == "exact" else jnp.zeros((m,), jnp.float32))
  u = jnp.where(jnp.isfinite(losses), u, jnp.nan)
  return grads, u, inner, losses, new_state


def all_exact_norms(loss_fn: Callable[[PyTree, PyTree], chex.Array],
                    params: PyTree, data: PyTree, *, chunk_size: int,
                    method: str) -> chex.Array:
  """Exact ‖∇f_i‖ of all n examples of ``data``, in chunks (the oracle's)."""
  return chunked_map(
      lambda b: norms_lib.per_example_grad_norms(loss_fn, params, b, method=method),
      data, chunk_size)


def full_gradient(loss_fn: Callable[[PyTree, PyTree], chex.Array], params: PyTree,
                  data: PyTree, *, chunk_size: int) -> PyTree:
  """∇F = (1/n) Σ_i ∇f_i over all n examples of ``data``, in chunks."""
  batches, real = _chunks(data, chunk_size)
  weights = real / norms_lib.batch_size_of(data)  # padding weighs 0

  def add_chunk(total, chunk):
    batch, w = chunk
    grads = jax.grad(lambda p: jnp.sum(w * loss_fn(p, batch)))(params)
    return jax.tree.map(jnp.add, total, grads), None

  return jax.lax.scan(add_chunk, jax.tree.map(jnp.zeros_like, params),
                      (batches, weights))[0]
