"""One jit-able training step that composes sampling, norms, (PT) and optax.

The same loop runs U-SGD, RAIS-SGD and O-SGD; only the sampler differs:

    state, metrics = step(state, key, data)

draws m indices from the sampler, gathers the batch from ``data`` (a pytree
with leading axis n, kept on device), computes the importance-weighted
minibatch gradient g_R = (1/m) Σ_k w_k ∇f_k with w_k = 1/(n p_k), measures
per-example gradient norms (the softmax-logit proxy, free with the forward
pass, or exact ones), updates the sampler, and applies the optimizer with the
gain ratio r as the ``gain_ratio`` extra argument. ``step`` is pure, so it can
be wrapped in ``jax.jit`` or driven by ``jax.lax.scan``.

Faults are survived, not spread: an example whose loss is not finite gives no
measurement (the sampler skips and counts it in ``nonfinite_norms``), and a
step whose minibatch loss or gradient is not finite leaves the parameters and
optimizer state unchanged and is counted in ``TrainState.skipped_steps``
(like ``optax.apply_if_finite``, but for any optimizer and without changing
its state).

The model is given as ``model_fn(params, batch) -> outputs`` and
``loss_head(outputs, batch) -> (m,)`` per-example losses; their composition is
the ``loss_fn(params, batch)`` that the rest of the library takes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax
from rais_jax import struct

from rais_jax import norms as norms_lib
from rais_jax import transform
from rais_jax.sampler import PER_STEP_KINDS, Sampler, SamplerState, fast_path_only

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], chex.Array]
LossHead = Callable[[chex.Array, PyTree], chex.Array]


@struct.dataclass
class TrainState(struct.PyTreeNode):
  params: PyTree
  opt_state: optax.OptState
  sampler: SamplerState
  # int32: steps whose loss or gradient was not finite; their update was
  # skipped (params and optimizer state kept).
  skipped_steps: chex.Array


class StepMetrics(NamedTuple):
  loss: chex.Array  # importance-weighted minibatch loss
  gain_ratio: chex.Array  # r used for this step's learning rate
  grad_sq_norm: chex.Array  # ‖g_R‖²
  applied: chex.Array  # bool: False when the update was skipped (non-finite)


def softmax_cross_entropy_head(label_key: str = "label") -> LossHead:
  """Per-example softmax cross-entropy against ``batch[label_key]``.

  A label outside [0, C) for C logits gives a NaN loss (optax's would be
  NaN above C but wrap a negative label onto a class): the step that draws
  it is skipped and counted (:attr:`RunnerState.skipped_steps`, with a
  warning from :meth:`Runner.run`), and :func:`evaluate` counts it.
  """

  def head(logits: chex.Array, batch: PyTree) -> chex.Array:
    labels = batch[label_key]
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    return jnp.where(valid, losses, jnp.nan)

  return head


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                     sampler: Sampler) -> TrainState:
  return TrainState(params=params, opt_state=optimizer.init(params),
                    sampler=sampler.init(),
                    skipped_steps=jnp.zeros((), jnp.int32))


def _gather(data: PyTree, indices: chex.Array) -> PyTree:
  return jax.tree.map(lambda x: x[indices], data)


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


def check_norms(norms: Optional[str], exact_method: str, sampler: Sampler
                ) -> Optional[str]:
  """The norm source the step will use, or one clear error.

  U-SGD never reads the norms, so it measures none (whatever ``norms``
  says); RAIS and O-SGD need them.
  """
  if norms not in ("proxy", "exact", None):
    raise ValueError(f"norms must be 'exact', 'proxy' or None; got {norms!r}.")
  if exact_method not in norms_lib.METHODS:
    raise ValueError(f"exact_method must be one of {norms_lib.METHODS}; got "
                     f"{exact_method!r}.")
  if not sampler.config.measures:
    return None
  if norms is None:
    raise ValueError(
        f"norms=None with a {sampler.config.kind!r} sampler: it learns its "
        "distribution and gain ratio from the measured per-example gradient "
        "norms. Use norms='exact' (the default) or 'proxy'.")
  if norms == "proxy" and sampler.batch_size % 2:
    raise ValueError(
        f"norms='proxy' splits each batch into two halves to estimate ‖∇F‖²; "
        f"batch_size must be even, got {sampler.batch_size}.")
  return norms


def check_data(data: PyTree, num_examples: int) -> None:
  """Trace-time check of the training set: out-of-range gathers would clamp
  silently."""
  n = norms_lib.batch_size_of(data)
  if n != num_examples:
    raise ValueError(
        f"data has {n} examples along its leading axis, but the sampler was "
        f"built for n = {num_examples}. Pass the whole training set the "
        "sampler's features describe.")


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


def make_train_step(model_fn: ModelFn, loss_head: LossHead,
                    optimizer: optax.GradientTransformationExtraArgs,
                    sampler: Sampler, *, norms: Optional[str] = "exact",
                    oracle_period: Optional[int] = None,
                    oracle_chunk_size: Optional[int] = None,
                    exact_method: str = "ghost",
                    batch_sharding: Optional[jax.sharding.Sharding] = None
                    ) -> Callable[[TrainState, chex.PRNGKey, PyTree],
                                  tuple[TrainState, StepMetrics]]:
  """Builds ``step(state, key, data) -> (state, metrics)``.

  Args:
    model_fn: ``(params, batch) -> outputs`` (e.g. logits).
    loss_head: ``(outputs, batch) -> (m,)`` per-example losses.
    optimizer: an optax transformation whose updates use the ``gain_ratio``
      extra argument, e.g. :func:`rais_jax.rais_sgd`, or
      ``optax.chain(optax.scale_by_adam(), rais_jax.scale_by_gain_ratio(lr))``;
      one that ignores it (a stock ``optax.sgd`` or ``optax.adam``) is
      refused at trace time for RAIS and O-SGD. U-SGD takes any optimizer.
    sampler: from :func:`rais_jax.rais_sampler`, :func:`uniform_sampler` or
      :func:`oracle_sampler`.
    norms: how u_k is measured: ``"exact"`` (default: the gradient and the
      exact norms from :func:`rais_jax.value_grad_and_norms`, with ghost
      norms one backward pass; the gain ratio uses them directly),
      ``"proxy"`` (‖∂f_k/∂outputs_k‖ from the same backward pass, split into
      two half-batches for the scale-free gain ratio; m must be even). A
      uniform sampler measures nothing (None is allowed only there).
    oracle_period: for an oracle sampler, refresh the exact norms of all n
      examples every this many steps (default 1: the true oracle; each
      refresh costs n per-example gradients).
    oracle_chunk_size: examples per chunk in that refresh (default m).
    exact_method: how exact norms are computed, for ``norms="exact"`` and the
      oracle refresh: ``"ghost"`` (default), ``"vmap"`` (the reference) or
      ``"auto"`` (the faster of the two, measured each time the step is
      traced: :func:`rais_jax.choose_method`).
    batch_sharding: data parallelism: a sharding for the sampled batch (leading
      axis m), e.g. ``NamedSharding(mesh, P("data"))``. The m examples are
      then spread over the devices, and the forward and backward passes and
      the per-example norms are computed where they live; the sampler state,
      the parameters and ``data`` stay as they are (replicated by default).
      Over several devices the sampler must use ``pt_mode="sync"``: an
      asynchronous (PT) solve inside a multi-device computation deadlocked
      (CPU, 2 and 4 simulated devices), so that is refused.

  Returns:
    The step function.
  """
  if sampler.config.kind not in PER_STEP_KINDS:
    raise ValueError(fast_path_only(sampler.config.kind))
  norms = check_norms(norms, exact_method, sampler)
  optimizer = optax.with_extra_args_support(optimizer)
  scale_free = norms == "proxy"
  if (batch_sharding is not None and len(batch_sharding.device_set) > 1
      and sampler.pt_mode == "async"):
    raise ValueError(
        "batch_sharding spans several devices, and an asynchronous (PT) solve "
        "inside a multi-device computation deadlocks (its host callback waits "
        "for a solve that cannot run while the devices wait for it). Build "
        "the sampler with rais_sampler(..., pt_mode='sync').")
  m = sampler.batch_size
  oracle_period = 1 if oracle_period is None else oracle_period
  oracle_chunk = m if oracle_chunk_size is None else oracle_chunk_size

  def loss_fn(params, batch):
    return loss_head(model_fn(params, batch), batch)

  def refresh_oracle(sampler_state: SamplerState, params, data) -> SamplerState:
    assert sampler.refresh is not None  # only oracle samplers are refreshed
    return sampler.refresh(sampler_state, all_exact_norms(
        loss_fn, params, data, chunk_size=oracle_chunk, method=exact_method))

  def step(state: TrainState, key: chex.PRNGKey, data: PyTree
           ) -> tuple[TrainState, StepMetrics]:
    check_data(data, sampler.num_examples)
    if sampler.config.measures:
      transform.check_gain_ratio_consumed(optimizer, state.params)
    if norms != "exact":  # value_grad_and_norms checks the loss itself
      norms_lib.check_loss_fn(loss_fn, state.params, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((m,) + x.shape[1:], x.dtype), data))
    sampler_state = state.sampler
    if sampler.refresh is not None:
      sampler_state = jax.lax.cond(
          sampler_state.step % oracle_period == 0,
          lambda s: refresh_oracle(s, state.params, data), lambda s: s,
          sampler_state)
    sample = sampler.sample(sampler_state, key)
    batch = _gather(data, sample.indices)
    if batch_sharding is not None:
      batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    w = sample.weights
    grads, u, inner, losses = measured_gradient(
        model_fn, loss_head, state.params, batch, w, norms=norms,
        exact_method=exact_method)
    grad_sq_norm = optax.tree.norm(grads, squared=True)
    # r comes from past steps only, so this step's noise does not set its own
    # learning rate.
    r = sampler.gain_ratio(sampler_state, scale_free=scale_free)
    sampler_state = sampler.update(sampler_state, sample, u,
                                   grad_sq_norm=grad_sq_norm,
                                   grad_halves_inner=inner)
    loss = jnp.mean(w * losses)
    # ‖g‖² is finite iff every gradient entry is (barring overflow past
    # 3e38, which is divergence anyway).
    applied = jnp.isfinite(loss) & jnp.isfinite(grad_sq_norm)

    def apply(params, opt_state):
      updates, opt_state = optimizer.update(grads, opt_state, params,
                                            gain_ratio=r)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.lax.cond(applied, apply, lambda p, o: (p, o),
                                     state.params, state.opt_state)
    metrics = StepMetrics(loss=loss, gain_ratio=r, grad_sq_norm=grad_sq_norm,
                          applied=applied)
    return TrainState(
        params=params, opt_state=opt_state, sampler=sampler_state,
        skipped_steps=state.skipped_steps + (~applied).astype(jnp.int32)
    ), metrics

  return step


def evaluate(model_fn: ModelFn, loss_head: LossHead, params: PyTree,
             data: PyTree, *, label_key: str = "label",
             chunk_size: int = 1024) -> dict[str, chex.Array]:
  """Mean loss and accuracy over all of ``data`` (uniform weights).

  ``"nonfinite"`` counts the examples whose loss is not finite (NaN inputs,
  labels outside the model's classes): the mean loss is then NaN.
  """
  def chunk(batch):
    out = model_fn(params, batch)
    return loss_head(out, batch), jnp.argmax(out, -1) == batch[label_key]

  losses, correct = chunked_map(chunk, data, chunk_size)
  return {"loss": losses.mean(), "accuracy": correct.mean(),
          "nonfinite": jnp.sum(~jnp.isfinite(losses))}
