"""The one training step, shared by the fast path and the per-step API.

One step (:func:`train_step`) is: gather the batch of the drawn indices (or
let the sampler choose among forwarded candidates), the loss, the
importance-weighted gradient g_R = (1/m) Σ_k w_k ∇f_k and the per-example
norms u_k in one backward pass, the gain ratio r from the moment averages of
*earlier* steps, the moments updated with this step's measurements, the
optimizer update with ``gain_ratio=r``; it returns what the sampler folds in
(u_k or the losses, per the sampler's facts). It has no branch and no
callback. Two drivers run it:

* the fast path (:mod:`rais_jax.runner`) scans it over a block of K drawn
  steps (:func:`block_steps`), with the block's first step, peeled off the
  loop, measuring ‖g_R‖² for the gain ratio; a block with a non-finite step
  is run again with a select in every step (``guarded``);
* the per-step API (:func:`rais_jax.make_train_step`) runs it guarded, K = 1.

Faults are survived, not spread: an example whose loss is not finite gives no
measurement (the sampler skips and counts it), and a step whose minibatch
loss or gradient is not finite leaves the parameters and optimizer state
unchanged and is counted in :attr:`TrainState.skipped_steps`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, cast

import chex
import jax
import jax.numpy as jnp
import optax

from rais_jax import augment as augment_lib
from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax import norms as norms_lib
from rais_jax import separability
from rais_jax import struct
from rais_jax.measure import (LossHead, loss_fn_of, measured_gradient,
                              measured_gradient_stateful)
from rais_jax.model import (ModelFn, StatefulModel, as_stateful, inference, step_keys,
                            training_loss)
from rais_jax.sampler import Sampler
from rais_jax.transform import check_gain_ratio_consumed

PyTree = Any

# How u_k can be measured: "auto" is exact norms for a loss whose examples are
# independent, proxy norms for one that couples them (measured: on the
# BatchNorm ResNet of the benchmarks, exact shares cost 1.8-2.2x a U-SGD step
# on CPU and proxy norms 0.97-1.08x, for the same epochs to U-SGD's loss).
NORMS = ("auto", "exact", "proxy")


@struct.dataclass
class TrainState(struct.PyTreeNode):
  """Everything a run carries, on device (both drivers, checkpoints)."""

  params: PyTree
  opt_state: optax.OptState
  sampler: PyTree  # the sampler's state
  moments: gain_ratio_lib.GainRatioState  # the gain ratio's moving averages
  step: chex.Array  # int32 steps taken
  # int32: steps whose loss or gradient was not finite; their update was
  # skipped (params and optimizer state kept).
  skipped_steps: chex.Array
  # The model's mutable state (BatchNorm statistics; () for a plain model).
  model_state: PyTree = ()


class StepMetrics(NamedTuple):
  loss: chex.Array  # importance-weighted minibatch loss
  gain_ratio: chex.Array  # r used for this step's learning rate
  grad_sq_norm: chex.Array  # ‖g_R‖² (NaN where a fast step left it out)
  applied: chex.Array  # bool: False when the update was skipped (non-finite)


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation,
                     sampler: Sampler, model_state: PyTree = ()) -> TrainState:
  """A fresh :class:`TrainState` holding ``params`` (and a
  :class:`~rais_jax.StatefulModel`'s ``model_state``) as given (both drivers)."""
  return TrainState(params=params, opt_state=optimizer.init(params),
                    sampler=sampler.init(), moments=gain_ratio_lib.init(),
                    step=jnp.zeros((), jnp.int32),
                    skipped_steps=jnp.zeros((), jnp.int32), model_state=model_state)


def check_norms(norms: Optional[str], exact_method: str, sampler: Sampler
                ) -> Optional[str]:
  """The norm source asked for (``"auto"`` is resolved by
  :attr:`StepSpec.norms`), or one clear error.

  A sampler that measures no norms gets none (whatever ``norms`` says).
  """
  if norms not in NORMS + (None,):
    raise ValueError(f"norms must be one of {NORMS} or None; got {norms!r}.")
  if exact_method not in norms_lib.METHODS:
    raise ValueError(f"exact_method must be one of {norms_lib.METHODS}; got "
                     f"{exact_method!r}.")
  if not sampler.measures_norms:
    return None
  if norms is None:
    raise ValueError(
        f"norms=None with a {sampler.name!r} sampler: it learns its "
        "distribution and gain ratio from the measured per-example gradient "
        "norms. Use norms='auto' (the default), 'exact' or 'proxy'.")
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


class StepSpec:
  """What a step is built from (static): the model, the optimizer, the
  sampler, how norms are measured and the augmentation.

  Attributes:
    stateful: the model was given as a :class:`~rais_jax.StatefulModel`.
    keyed: steps get keys (a stateful model or an augmentation).
    coupled: the model's training-mode loss couples the examples of a batch
      (BatchNorm), found by the probe at the first trace (None before).
    chosen_methods: with ``exact_method="auto"``, the method
      :func:`rais_jax.choose_method` measured, per (parameter and batch)
      shapes: measured once, so every program built from this spec uses the
      same.
  """

  def __init__(self, model_fn: ModelFn | StatefulModel, loss_head: LossHead,
               optimizer: optax.GradientTransformation, sampler: Sampler, *,
               norms: Optional[str], exact_method: str,
               batch_sharding: Optional[jax.sharding.Sharding] = None,
               augment: Optional[augment_lib.Augment] = None, unroll: bool = False):
    self.model, self.stateful = as_stateful(model_fn)
    self.unroll = unroll
    # The plain form (used where the model is not stateful).
    self.model_fn: ModelFn = cast(ModelFn, model_fn)
    self.loss_head = loss_head
    self.augment = augment
    self.keyed = self.stateful or augment is not None
    self.coupled: Optional[bool] = None
    # Any optax transformation may run U-SGD: give it the extra-args calling
    # convention (samplers that boost the learning rate check at trace time
    # that r reaches it).
    self.optimizer = optax.with_extra_args_support(optimizer)
    self.sampler = sampler
    self.norms_asked = check_norms(norms, exact_method, sampler)
    self.exact_method = exact_method
    self.batch_sharding = batch_sharding
    # The loss in inference mode (the oracle, the exact gain ratio, the
    # per-example checks); a stateful model's reads its state from the step.
    self.loss_fn = loss_fn_of(self.model_fn, loss_head) if not self.stateful else None
    self.chosen_methods: dict[Any, str] = {}

  def eval_loss_fn(self, model_state: PyTree):
    """``loss_fn(params, batch)`` in inference mode with ``model_state``."""
    if not self.stateful:
      return self.loss_fn
    return loss_fn_of(inference(self.model, model_state), self.loss_head)

  def method_for(self, params: PyTree, batch: PyTree, model_state: PyTree = ()
                 ) -> str:
    """``exact_method``, with "auto" measured once per shape (at trace time;
    a stateful model's in inference mode; a coupled one's is ghost)."""
    if self.exact_method != "auto":
      return self.exact_method
    if self.coupled:
      return "ghost"
    leaves, tree = jax.tree.flatten((params, batch))
    key = (tree, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))
    if key not in self.chosen_methods:
      self.chosen_methods[key] = norms_lib.choose_method(
          self.eval_loss_fn(model_state), params, batch)
    return self.chosen_methods[key]

  def gather(self, data: PyTree, indices: chex.Array) -> PyTree:
    return self.place(jax.tree.map(lambda x: x[indices], data))

  def place(self, batch: PyTree) -> PyTree:
    """The batch laid out as ``batch_sharding`` asks (if given)."""
    if self.batch_sharding is None:
      return batch
    return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

  def gain_ratio(self, moments: gain_ratio_lib.GainRatioState) -> chex.Array:
    """r from the moments (1 for samplers that do not raise the learning rate)."""
    smp = self.sampler
    if not smp.boosts_lr:
      return jnp.ones((), jnp.float32)
    if self.stateful and self.coupled is None:
      raise ValueError(
          "the gain ratio of a rais_jax.StatefulModel depends on whether its "
          "training-mode loss couples examples (BatchNorm), which the first "
          "traced step probes: run a step (or restore a state and run one) "
          "before asking for it.")
    return gain_ratio_lib.estimate(moments, smp.batch_size, r_max=smp.r_max,
                                   scale_free=self.halves,
                                   coupled=bool(self.coupled))

  @property
  def norms(self) -> Optional[str]:
    """The norm source the steps use: ``norms_asked``, with ``"auto"``
    resolved to ``"proxy"`` for a loss that couples examples (known after
    the first :meth:`check` of a stateful model) and an even batch, and to
    ``"exact"`` otherwise."""
    if self.norms_asked != "auto":
      return self.norms_asked
    if self.stateful and self.coupled is None:
      raise ValueError(
          "norms='auto' of a rais_jax.StatefulModel depends on whether its "
          "training-mode loss couples examples, which the first traced step "
          "probes: run a step before asking for it.")
    if self.coupled and self.sampler.batch_size % 2 == 0:
      return "proxy"
    return "exact"

  @property
  def halves(self) -> bool:
    """Every step measures ⟨g_A, g_B⟩ of its two halves: proxy norms (the
    scale-free gain ratio) of a loss that does not couple examples ("auto"
    picks proxy norms only for a coupled loss)."""
    return self.norms_asked == "proxy" and not self.coupled

  def check_on_data(self, params: PyTree, data: PyTree, model_state: PyTree = ()
                    ) -> None:
    """:func:`check_data`, then :meth:`check` on one batch of m rows of ``data``."""
    check_data(data, self.sampler.num_examples)
    m = self.sampler.batch_size
    self.check(params, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((m,) + x.shape[1:], x.dtype), data),
               model_state)

  def check(self, params: PyTree, batch: PyTree, model_state: PyTree = ()) -> None:
    """Trace-time checks of the optimizer, and of the loss on one batch's
    shapes (``jax.ShapeDtypeStruct`` leaves); for a stateful model, whether
    its training-mode loss couples examples (:attr:`coupled`)."""
    if self.sampler.boosts_lr:
      check_gain_ratio_consumed(self.optimizer, params)
    norms_lib.check_loss_fn(self.eval_loss_fn(model_state), params, batch)
    if self.stateful and self.coupled is None:
      # Not probed (None) counts as coupled: ghost norms then insist on the
      # batched trace, which gives the shares either way.
      self.coupled = separability.is_separable(
          self._probe_loss(model_state), params, batch) is not True
      if (self.coupled and self.norms == "exact"
          and self.exact_method not in ("ghost", "auto")):
        raise ValueError(
            "the model's training-mode loss couples the examples of a batch "
            "(BatchNorm): per-example gradients are not defined, and "
            f"exact_method={self.exact_method!r} would compute those of another "
            "function. Use exact_method='ghost', which measures each example's "
            "share of the training gradient (see rais_jax.model).")

  def _probe_loss(self, model_state: PyTree):
    """The training-mode loss with concrete stand-ins for the state and key,
    for the separability probe."""
    with jax.ensure_compile_time_eval():  # concrete, also inside a trace
      state = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), model_state)
      key = jax.random.key(0)
    loss = training_loss(self.model, self.loss_head, state, key)
    return lambda p, b: loss(p, b)[0]

  def prepare(self, batch: PyTree, step_key: Optional[chex.PRNGKey]
              ) -> tuple[PyTree, Optional[chex.PRNGKey]]:
    """The batch augmented (if asked) and the model's key, from the step's."""
    if step_key is None:
      return batch, None
    model_key, augment_key = jax.random.split(step_key)
    if self.augment is not None:
      batch = self.place(augment_lib.batch(self.augment, augment_key, batch))
    return batch, model_key


def _tree_select(pred: chex.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


# The carry of the step: (params, opt_state, moments, skipped steps, the
# sampler state when the sampler chooses inside the step, else None, the
# model state).
Carry = tuple


def train_step(spec: StepSpec, data: Optional[PyTree], context: PyTree, carry: Carry,
               xs: Any, *, guarded: bool, measure_grad: bool,
               grad_rate: Optional[float] = None) -> tuple[Carry, tuple]:
  """One SGD step: no branch, no callback.

  ``xs`` is the step's draw, gathered from ``data``; or, with ``data`` None,
  (draw, the batch a loader fetched for it); with ``spec.keyed``, that and
  the step's key (:func:`rais_jax.model.step_keys`). ``context`` is the sampler
  state the draw came from (e.g. InfoBatch's schedule advance is read from
  it). ``guarded`` selects the old parameters and optimizer state when the
  step's loss or gradient is not finite (a select keeps both versions
  alive, which costs a copy of the optimizer state: the fast path leaves it
  out and re-runs a block guarded only when needed). ``measure_grad``:
  whether this step's ‖g_R‖² enters the gain ratio's averages, at EMA rate
  ``grad_rate`` (default α; a pass over the gradient: exact norms need it on
  one step per block, proxy norms of a separable loss on every step; see
  :mod:`rais_jax.gain_ratio`).

  Returns the carry and (what the sampler folds in, the step's metrics).
  """
  params, opt_state, moments, skipped, chooser, model_state = carry
  smp = spec.sampler
  xs, step_key = xs if spec.keyed else (xs, None)
  drawn, loaded = xs if data is None else (xs, None)
  if smp.select is not None:  # forward the candidates, let the sampler choose
    candidate_losses = spec.eval_loss_fn(model_state)(
        params, spec.gather(data, drawn.indices))
    indices, weights, chooser = smp.select(chooser, drawn, candidate_losses)
  else:
    indices, weights = drawn.indices, drawn.weights
  batch = spec.gather(data, indices) if loaded is None else spec.place(loaded)
  batch, model_key = spec.prepare(batch, step_key)
  method = (spec.method_for(params, batch, model_state) if spec.norms == "exact"
            else "ghost")
  if spec.stateful:
    grads, u, inner, losses, new_model_state = measured_gradient_stateful(
        spec.model, spec.loss_head, params, model_state, model_key, batch, weights,
        norms=spec.norms, exact_method=method, coupled=bool(spec.coupled))
  else:
    grads, u, inner, losses = measured_gradient(
        spec.model_fn, spec.loss_head, params, batch, weights, norms=spec.norms,
        exact_method=method)
    new_model_state = model_state
  loss = jnp.mean(weights * losses)
  # r comes from past steps only, so this step's noise does not set its own
  # learning rate.
  r = spec.gain_ratio(moments)
  measure_grad = smp.boosts_lr and measure_grad
  if measure_grad or guarded:
    grad_sq_norm = optax.tree.norm(grads, squared=True)
    applied = jnp.isfinite(loss) & jnp.isfinite(grad_sq_norm)
  else:
    # ‖g‖² is a pass over the gradient; the block's final check catches a
    # non-finite gradient behind a finite loss.
    grad_sq_norm = jnp.full((), jnp.nan, jnp.float32)
    applied = jnp.isfinite(loss)
  if smp.boosts_lr:
    moments = gain_ratio_lib.update(
        moments, u, drawn.probs, smp.num_examples,
        grad_sq_norm if measure_grad else None, grad_halves_inner=inner,
        alpha=smp.ema_rate, grad_alpha=grad_rate)
  extra = {} if smp.optimizer_args is None else smp.optimizer_args(context)
  updates, new_opt_state = spec.optimizer.update(grads, opt_state, params,
                                                 gain_ratio=r, **extra)
  new_params = optax.apply_updates(params, updates)
  if guarded:
    new_params = _tree_select(applied, new_params, params)
    new_opt_state = _tree_select(applied, new_opt_state, opt_state)
    new_model_state = _tree_select(applied, new_model_state, model_state)
    skipped = skipped + (~applied).astype(jnp.int32)
  carry = (new_params, new_opt_state, moments, skipped, chooser, new_model_state)
  measured = u if smp.measures_norms else losses if smp.folds_losses else None
  return carry, (measured, StepMetrics(loss=loss, gain_ratio=r,
                                       grad_sq_norm=grad_sq_norm, applied=applied))


def grad_rate(ema_rate: float, block_length: int) -> float:
  """The EMA rate of ‖g_R‖² measured once per block of this length.

  Between α (as many measurements averaged as per step, over K times as
  many steps: it lags) and 1 − (1 − α)^K (the same span of steps from K
  times fewer measurements: noisy), at the geometric mean of the two
  exponents, √K (α = 0.1, K = 25: 0.41; ``benchmarks/bench_gain_ratio.py``
  compares the choices against the exact ratio).
  """
  return 1.0 - (1.0 - ema_rate) ** math.sqrt(block_length)


def scan_steps(spec: StepSpec, data: Optional[PyTree], context: PyTree,
               carry: Carry, xs: Any, *, guarded: bool) -> tuple[Carry, tuple]:
  """A block's steps in one ``lax.scan``. With exact norms the first step,
  peeled off the loop, is the one that measures ‖g_R‖² for the gain ratio
  (the loop body has no branch, so the others leave that pass out). The
  guarded re-run computes ‖g_R‖² on every step anyway (to find the bad
  ones), so it averages it on every step, at rate α, in one loop (which also
  spares compiling a fourth copy of the step). Each step's metrics leave the
  loop as one vector (one write per step)."""

  def step(carry, xs, **kwargs):
    carry, (measured, metrics) = train_step(spec, data, context, carry, xs,
                                            guarded=guarded, **kwargs)
    return carry, (measured, jnp.stack([
        metrics.loss, metrics.gain_ratio, metrics.grad_sq_norm,
        metrics.applied]).astype(jnp.float32))

  every_step = guarded or spec.halves
  if every_step or not spec.sampler.boosts_lr:
    carry, (measured, stacked) = jax.lax.scan(
        functools.partial(step, measure_grad=every_step), carry, xs,
        unroll=spec.unroll)
  else:
    k = jax.tree.leaves(xs)[0].shape[0]
    carry, first = step(carry, jax.tree.map(lambda x: x[0], xs), measure_grad=True,
                        grad_rate=grad_rate(spec.sampler.ema_rate, k))
    carry, rest = jax.lax.scan(functools.partial(step, measure_grad=False),
                               carry, jax.tree.map(lambda x: x[1:], xs),
                               unroll=spec.unroll)
    measured, stacked = jax.tree.map(
        lambda a, b: jnp.concatenate([a[None], b]), first, rest)
  loss, r, g2, applied = stacked.T
  return carry, (measured, StepMetrics(loss=loss, gain_ratio=r,
                                       grad_sq_norm=g2, applied=applied > 0))


def block_steps(spec: StepSpec, data: Optional[PyTree], context: PyTree,
                carry: Carry, xs: Any) -> tuple[Carry, tuple]:
  """The K steps: fast, then re-run guarded if anything was not finite.

  The guarded re-run starts again from the block's start with the select in
  every step, which skips exactly the steps whose loss or ‖g‖² is not
  finite. The fast scan computes ‖g‖² only where the gain ratio needs it, so
  it is accepted when every step's loss (and ‖g‖², where computed) was
  finite and the final parameters and optimizer state are finite: a
  non-finite gradient entry behind a finite loss ends up there (SGD and its
  variants never turn NaN or ±inf back into finite values), and the re-run
  would then apply every step and end in the same state. That check is one
  sum per leaf (an overflowing sum is a false alarm that costs a re-run,
  never a missed NaN), and the ``cond`` runs once per block.
  """
  fast, out = scan_steps(spec, data, context, carry, xs, guarded=False)
  _, metrics = out
  ok = jnp.all(metrics.applied)
  ok &= jnp.isfinite(sum(jnp.sum(x) for x in jax.tree.leaves((fast[0], fast[1], fast[5]))
                         if jnp.issubdtype(x.dtype, jnp.inexact)))
  return jax.lax.cond(
      ok, lambda: (fast, out),
      lambda: scan_steps(spec, data, context, carry, xs, guarded=True))


def run_block(spec: StepSpec, state: TrainState, data: Optional[PyTree], drawn: Any,
              xs: Any, key: Optional[chex.PRNGKey] = None
              ) -> tuple[TrainState, StepMetrics]:
  """Scan the block's steps over ``xs`` (the draw, or the draw with its loaded
  batches) and fold the measurements into the sampler state. ``key``: the
  block's key, from which each step's comes (for ``spec.keyed``)."""
  smp = spec.sampler
  k = drawn.indices.shape[0]
  if spec.keyed:
    if key is None:
      raise ValueError("this model or augmentation needs a key per block: pass "
                       "the block's key.")
    xs = (xs, step_keys(key, state.step + jnp.arange(k)))
  chooser = state.sampler if smp.select is not None else None
  carry = (state.params, state.opt_state, state.moments, state.skipped_steps,
           chooser, state.model_state)
  carry, (measured, metrics) = block_steps(spec, data, state.sampler, carry, xs)
  params, opt_state, moments, skipped, chooser, model_state = carry
  sampler_state = state.sampler if chooser is None else chooser
  return TrainState(
      params=params, opt_state=opt_state,
      sampler=smp.fold_in(sampler_state, drawn, measured),
      moments=moments, step=state.step + k, skipped_steps=skipped,
      model_state=model_state), metrics
