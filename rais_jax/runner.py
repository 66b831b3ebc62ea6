"""The fast training path: blocks of K steps in one scan, the sampler's work between blocks.

A RAIS step on an accelerator is latency-bound: a plain SGD step of a small
MLP takes ~40–50 µs on a GPU, and every branch (``lax.cond`` reads its
predicate back to the host: ~14 µs), host callback or chain of small ops
after the backward pass adds to it. So the step is reorganised by a static
schedule (:func:`make_runner`):

1. before a block, one tree descent draws the indices of all K steps,
   (K, m), with their p (:func:`rais_jax.block_sampler.draw`);
2. the block is one ``lax.scan`` whose body is the plain step plus a few
   fused element-wise ops: gather the batch, loss, gradient and per-example
   norms u_k in one backward pass, the gain ratio r from the moment EMAs and
   the optimizer update with ``gain_ratio=r`` (no ``cond``, no ``while``, no
   callback: tested on the compiled program); the block's first step, peeled
   off the loop, also measures ‖g_R‖² for the gain ratio; a block with a
   non-finite step is run again with a select in every step;
3. after the block, the K·m measurements are folded into features, the ring
   buffer D and the sum-trees at once;
4. at the block boundaries the schedule names, separate small programs do the
   period work: apply a (PT) result that is due, snapshot D for the next
   solve, refresh the O-SGD oracle. No ``cond`` carries the O(n) sampler
   state (XLA copies a conditional's operands).

Every weight uses the p its index was drawn from, so g_R stays unbiased; the
features and trees are up to K steps stale. The (PT) period becomes a multiple
of K: P = K ⌈⌈|D|/m⌉ / K⌉ steps, and its delay a whole number of blocks.

:meth:`Runner.run` drives blocks from the host: the blocks between two
period boundaries are one program (:meth:`Runner.blocks`, a scan over blocks
whose keys are folded in on device; an epoch for methods without period
work), since on a GPU every program the host issues and every eager op
between them costs ~0.1–0.5 ms of the host's time; methods without period
work may end a run with shorter blocks (powers of two).
:meth:`Runner.run_epoch` runs n // m steps, or InfoBatch's planned epoch.
With ``pt_mode="async"`` each
snapshot is solved by a :class:`rais_jax.pt_service.SolveService` on the host
CPU while training goes on, and the result enters the block it is due in as an
argument; ``"sync"`` waits for each solve. The two give bit-identical runs.
:meth:`Runner.block` is one whole block with its period work as ``lax.cond``s,
pure, for a ``lax.scan`` over blocks in one program (with ``solved=None`` it
solves (PT) in-graph); on the CPU that is bit-identical too.
The block keys are ``fold_in(key, step)``, so a run resumed from a
checkpoint at any block boundary continues bit-identically.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from rais_jax import struct

from rais_jax import block_sampler as bs
from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax import norms as norms_lib
from rais_jax import records as records_lib
from rais_jax import pt_service
from rais_jax import selection
from rais_jax.transform import check_gain_ratio_consumed
from rais_jax.sampler import Sampler
from rais_jax.train import (LossHead, ModelFn, StepMetrics, all_exact_norms,
                            check_data, check_norms, full_gradient,
                            measured_gradient)

PyTree = Any


@struct.dataclass
class RunnerState(struct.PyTreeNode):
  params: PyTree
  opt_state: optax.OptState
  sampler: PyTree  # block_sampler.RobustState / UniformState, or a selection state
  moments: gain_ratio_lib.GainRatioState  # the gain ratio's EMAs
  step: chex.Array  # int32 steps taken (RAIS, O-SGD: a multiple of K between blocks)
  skipped_steps: chex.Array  # int32 steps whose update was not finite


# The methods that read the whole training set on device, so cannot take a loader.
_NEED_ALL_DATA = {
    "oracle": "O-SGD refreshes the exact norms of all n examples: it needs "
              "the whole training set on device, not a loader.",
    "selective": "Selective-Backprop forwards candidates drawn inside the "
                 "step: it needs the whole training set on device, not a loader.",
}


def _tree_select(pred: chex.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class Runner:
  """Built by :func:`make_runner`: ``init``, the pure ``steps`` / period-work
  functions / ``block``, and the host driver ``run``.

  Attributes:
    block_size: K, steps per block.
    pt_period, pt_delay: the (PT) schedule in steps (multiples of K).
    service: the :class:`~rais_jax.pt_service.SolveService` (``pt_mode``
      async or sync; None otherwise). :meth:`close` drops its results.
    chosen_methods: with ``exact_method="auto"``, the method
      :func:`rais_jax.choose_method` measured, per (parameter and batch)
      shapes: measured once, so every block program of a runner uses the same.
  """

  def __init__(self, *, model_fn: ModelFn, loss_head: LossHead,
               optimizer: optax.GradientTransformationExtraArgs,
               sampler: Sampler, norms: Optional[str], block_size: int,
               exact_method: str, oracle_period: int, oracle_chunk_size: int,
               batch_sharding: Optional[jax.sharding.Sharding],
               pt_device: Optional[jax.Device]):
    config = sampler.config
    k = block_size
    # Any optax transformation may run U-SGD: give it the extra-args calling
    # convention (RAIS and O-SGD check at trace time that r reaches it).
    self.optimizer = optax.with_extra_args_support(optimizer)
    self.config, self.block_size = config, k
    self.num_examples, self.batch_size = config.num_examples, config.batch_size
    self.pt_enabled = config.kind == "rais" and config.pt_period > 0
    # Period work at block boundaries ((PT), the oracle's refresh) needs runs
    # in whole blocks; the others may end a run with shorter blocks.
    self.whole_blocks = self.pt_enabled or config.kind == "oracle"
    self._lib = selection if config.kind in selection.KINDS else bs
    blocks = lambda steps: max(1, math.ceil(steps / k))
    self.pt_period = k * blocks(config.pt_period)
    self.pt_delay = k * min(blocks(config.pt_delay), self.pt_period // k)
    self.oracle_period = k * blocks(oracle_period)
    self.service = (pt_service.SolveService(
        max_iters=config.pt_max_iters, device=pt_device,
        wait=config.pt_mode == "sync") if self.pt_enabled else None)
    self._model_fn, self._loss_head, self._norms = model_fn, loss_head, norms
    self._exact_method, self._oracle_chunk = exact_method, oracle_chunk_size
    self.chosen_methods: dict[Any, str] = {}
    self._batch_sharding = batch_sharding
    # The state is donated: the O(n) sampler arrays are updated in place.
    self._jitted = {name: jax.jit(getattr(self, name), donate_argnums=0)
                    for name in ("refresh", "deliver", "submit", "plan",
                                 "_submit_snapshot", "_deliver_and_snapshot")}
    self._jitted["blocks"] = jax.jit(self.blocks, donate_argnums=0,
                                     static_argnames=("num_blocks", "num_steps"))
    self._jitted["fed_steps"] = jax.jit(self.fed_steps, donate_argnums=0)
    self._jitted["_header"] = jax.jit(self._header)
    self._jitted["draw"] = jax.jit(self.draw, static_argnames="num_steps")
    # One program joins the metrics of a run's programs (eager concatenations
    # cost a dispatch per field, ~0.1–0.5 ms each on a GPU's host).
    self._jitted["concat"] = jax.jit(
        lambda parts: jax.tree.map(lambda *x: jnp.concatenate(x), *parts))
    # What the last run returned: weak references to the arrays its
    # host-side values were read from, and (step, skipped, solve in flight).
    self._returned: Optional[tuple[tuple, tuple]] = None

  # -- pure functions ------------------------------------------------------

  def init(self, params: PyTree) -> RunnerState:
    """A fresh state holding a copy of ``params`` (:meth:`run` donates it).

    Every leaf is committed to the default device, as the outputs of the
    compiled programs are: otherwise the first blocks would see a different
    mix of placements than later ones and compile again mid-run. (Place it
    elsewhere, e.g. replicated over a mesh, with ``jax.device_put``.)
    """
    params = jax.tree.map(jnp.copy, params)
    state = RunnerState(params=params, opt_state=self.optimizer.init(params),
                        sampler=self._lib.init(self.config),
                        moments=gain_ratio_lib.init(),
                        step=jnp.zeros((), jnp.int32),
                        skipped_steps=jnp.zeros((), jnp.int32))
    return jax.device_put(state, jax.local_devices()[0])

  def _loss_fn(self, params: PyTree, batch: PyTree) -> chex.Array:
    """The per-example losses (m,) of ``model_fn`` composed with ``loss_head``."""
    return self._loss_head(self._model_fn(params, batch), batch)

  def gain_ratio(self, state: RunnerState) -> chex.Array:
    """r the next step will use."""
    return self._gain_ratio(state.moments)

  def _gain_ratio(self, moments: gain_ratio_lib.GainRatioState) -> chex.Array:
    cfg = self.config
    if not cfg.measures:
      return jnp.ones((), jnp.float32)
    return gain_ratio_lib.estimate(moments, cfg.batch_size, r_max=cfg.r_max,
                                   scale_free=self._norms == "proxy")

  def exact_gain_ratio(self, state: RunnerState, data: PyTree, *,
                       chunk_size: int = 1024) -> gain_ratio_lib.ExactGainRatio:
    """The true gain ratio at ``state``'s parameters and sampling
    distribution: exact norms of all n examples and the full gradient (two
    passes over the data; for analysis, e.g. against :meth:`gain_ratio`)."""
    loss_fn = self._loss_fn
    norms = all_exact_norms(
        loss_fn, state.params, data, chunk_size=chunk_size,
        method=self._chunk_method(state.params, data, chunk_size))
    grads = full_gradient(loss_fn, state.params, data, chunk_size=chunk_size)
    probs = bs.probabilities(self.config, state.sampler)
    return gain_ratio_lib.exact(norms, probs, optax.tree.norm(grads, squared=True),
                                self.batch_size)

  def _method(self, params: PyTree, batch: PyTree) -> str:
    """``exact_method``, with "auto" measured once per shape (at trace time)."""
    if self._exact_method != "auto":
      return self._exact_method
    leaves, tree = jax.tree.flatten((params, batch))
    key = (tree, tuple((x.shape, jnp.dtype(x.dtype)) for x in leaves))
    if key not in self.chosen_methods:
      self.chosen_methods[key] = norms_lib.choose_method(self._loss_fn, params, batch)
    return self.chosen_methods[key]

  def _chunk_method(self, params: PyTree, data: PyTree, chunk_size: int) -> str:
    """The method for chunks of ``data`` (O-SGD's refresh, the exact gain ratio)."""
    return self._method(params, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((chunk_size,) + x.shape[1:], x.dtype), data))

  def _gather(self, data: PyTree, indices: chex.Array) -> PyTree:
    return self._place(jax.tree.map(lambda x: x[indices], data))

  def _place(self, batch: PyTree) -> PyTree:
    """The batch laid out as ``batch_sharding`` asks (if given)."""
    if self._batch_sharding is None:
      return batch
    return jax.lax.with_sharding_constraint(batch, self._batch_sharding)

  def _step(self, data: Optional[PyTree], context, carry, xs, *, guarded: bool,
            measure_grad: bool, grad_rate: Optional[float] = None):
    """One SGD step of the block's scan: no branch, no callback.

    ``xs`` is the step's draw, gathered from ``data``; or, with ``data``
    None, (draw, the batch a loader fetched for it).

    ``context`` is the sampler state at the block's start (InfoBatch reads
    its schedule advance); Selective-Backprop's small state (its loss
    history) is in the carry instead, updated every step. ``guarded``
    selects the old parameters and optimizer state when the step's loss or
    gradient is not finite; the fast scan leaves that out (a select keeps
    both versions alive, which costs a copy of the optimizer state every
    step) and the block re-runs guarded only when needed. ``measure_grad``:
    whether this step's ‖g_R‖² enters the gain ratio's averages, at EMA rate
    ``grad_rate`` (a pass over the gradient: exact norms need it on one step
    per block, proxy norms on every step; see :mod:`rais_jax.gain_ratio`).

    Returns the carry and (what the sampler folds in, the step's metrics).
    """
    params, opt_state, moments, skipped, stepwise = carry
    cfg = self.config
    drawn, loaded = xs if data is None else (xs, None)
    if cfg.kind == "selective":  # forward the candidates, keep high losses
      candidate_losses = self._loss_fn(params, self._gather(data, drawn.indices))
      slots, valid = selection.select(cfg, stepwise.history, candidate_losses,
                                      drawn.uniforms)
      kept = valid.sum(dtype=jnp.int32)
      stepwise = selection.record_step(cfg, stepwise, candidate_losses, kept)
      # Empty slots repeat the first kept example at weight 0 (an unkept
      # candidate could have a NaN loss, and 0 · NaN would void the step).
      indices = jnp.where(valid, drawn.indices[slots], drawn.indices[slots[0]])
      weights = valid * (self.batch_size / jnp.maximum(kept, 1))
    else:
      indices, weights = drawn.indices, drawn.weights
    batch = self._gather(data, indices) if loaded is None else self._place(loaded)
    grads, u, inner, losses = measured_gradient(
        self._model_fn, self._loss_head, params, batch, weights,
        norms=self._norms,
        exact_method=self._method(params, batch) if self._norms == "exact" else "ghost")
    loss = jnp.mean(weights * losses)
    # r comes from past steps only, so this step's noise does not set its own
    # learning rate.
    r = self._gain_ratio(moments)
    measure_grad = cfg.measures and measure_grad
    if measure_grad or guarded:
      grad_sq_norm = optax.tree.norm(grads, squared=True)
      applied = jnp.isfinite(loss) & jnp.isfinite(grad_sq_norm)
    else:
      # ‖g‖² is a pass over the gradient; the block's final check catches a
      # non-finite gradient behind a finite loss.
      grad_sq_norm = jnp.full((), jnp.nan, jnp.float32)
      applied = jnp.isfinite(loss)
    if cfg.measures:
      moments = gain_ratio_lib.update(
          moments, u, drawn.probs, cfg.num_examples,
          grad_sq_norm if measure_grad else None,
          grad_halves_inner=inner, alpha=cfg.ema_rate, grad_alpha=grad_rate)
    extra = ({"schedule_advance": context.schedule_advance}
             if cfg.kind == "infobatch" else {})
    updates, new_opt_state = self.optimizer.update(grads, opt_state, params,
                                                   gain_ratio=r, **extra)
    new_params = optax.apply_updates(params, updates)
    if guarded:
      new_params = _tree_select(applied, new_params, params)
      new_opt_state = _tree_select(applied, new_opt_state, opt_state)
      skipped = skipped + (~applied).astype(jnp.int32)
    carry = (new_params, new_opt_state, moments, skipped, stepwise)
    if cfg.kind == "selective":
      measured = None  # recorded in the carry
    elif cfg.kind in ("loss", "infobatch"):
      measured = losses
    elif cfg.measures:
      measured = u
    else:
      measured = None  # U-SGD folds nothing in
    return carry, (measured, StepMetrics(loss=loss, gain_ratio=r,
                                         grad_sq_norm=grad_sq_norm,
                                         applied=applied))

  def _steps_scan(self, data: Optional[PyTree], context, carry, xs, *,
                  guarded: bool):
    """The block's steps in one ``lax.scan``. With exact norms the first
    step, peeled off the loop, is the one that measures ‖g_R‖² for the gain
    ratio (the loop body has no branch, so the others leave that pass out).
    The guarded re-run computes ‖g_R‖² on every step anyway (to find the bad
    ones), so it averages it on every step, at rate α, in one loop (which
    also spares compiling a fourth copy of the step). Each step's metrics
    leave the loop as one vector (one write per step)."""

    def step(carry, xs, **kwargs):
      carry, (measured, metrics) = self._step(data, context, carry, xs,
                                              guarded=guarded, **kwargs)
      return carry, (measured, jnp.stack([
          metrics.loss, metrics.gain_ratio, metrics.grad_sq_norm,
          metrics.applied]).astype(jnp.float32))

    every_step = guarded or self._norms == "proxy"
    if every_step or not self.config.measures:
      carry, (measured, stacked) = jax.lax.scan(
          functools.partial(step, measure_grad=every_step), carry, xs)
    else:
      k = jax.tree.leaves(xs)[0].shape[0]
      carry, first = step(carry, jax.tree.map(lambda x: x[0], xs),
                          measure_grad=True, grad_rate=self._grad_rate(k))
      carry, rest = jax.lax.scan(functools.partial(step, measure_grad=False),
                                 carry, jax.tree.map(lambda x: x[1:], xs))
      measured, stacked = jax.tree.map(
          lambda a, b: jnp.concatenate([a[None], b]), first, rest)
    loss, r, g2, applied = stacked.T
    return carry, (measured, StepMetrics(loss=loss, gain_ratio=r,
                                         grad_sq_norm=g2, applied=applied > 0))

  def _grad_rate(self, block_length: int) -> float:
    """The EMA rate of ‖g_R‖² measured once per block of this length.

    Between α (as many measurements averaged as per step, over K times as
    many steps: it lags) and 1 − (1 − α)^K (the same span of steps from K
    times fewer measurements: noisy), at the geometric mean of the two
    exponents, √K (α = 0.1, K = 25: 0.41). Measured on MNIST-1D
    (``benchmarks/bench_gain_ratio.py``, median |r̂/r − 1| after warm-up):
    rate α 0.095 and rate 0.93 0.084 with spikes to +160 % (3 seeds each);
    0.41, 0.5 and 0.8 gave 0.074, 0.072 and 0.069 (6 seeds), measuring every
    step 0.069.
    """
    return 1.0 - (1.0 - self.config.ema_rate) ** math.sqrt(block_length)

  def _scan(self, data: Optional[PyTree], context, carry, drawn):
    """The K steps: fast, then re-run guarded if anything was not finite.

    The guarded re-run starts again from the block's start with the select
    in every step, which skips exactly the steps whose loss or ‖g‖² is not
    finite. The fast scan computes ‖g‖² only where the gain ratio needs it
    (a pass over the gradient), so it is accepted when every step's loss
    (and ‖g‖², where computed) was finite and the final parameters and
    optimizer state are finite: a non-finite gradient entry behind a finite
    loss ends up there (SGD and its variants never turn NaN or ±inf back into
    finite values), and the re-run would then apply every step and end in the
    same state. That check is one sum per leaf (an overflowing sum is a false
    alarm that costs a re-run, never a missed NaN), and the ``cond`` runs
    once per block.
    """
    fast, out = self._steps_scan(data, context, carry, drawn, guarded=False)
    _, metrics = out
    ok = jnp.all(metrics.applied)
    ok &= jnp.isfinite(sum(jnp.sum(x) for x in jax.tree.leaves((fast[0], fast[1]))
                           if jnp.issubdtype(x.dtype, jnp.inexact)))
    return jax.lax.cond(
        ok, lambda: (fast, out),
        lambda: self._steps_scan(data, context, carry, drawn, guarded=True))

  def _refresh_oracle(self, sampler_state, params, data):
    return bs.refresh(self.config, sampler_state, all_exact_norms(
        self._loss_fn, params, data, chunk_size=self._oracle_chunk,
        method=self._chunk_method(params, data, self._oracle_chunk)))

  def steps(self, state: RunnerState, key: chex.PRNGKey, data: PyTree, *,
            num_steps: Optional[int] = None) -> tuple[RunnerState, StepMetrics]:
    """The K steps of a block without the period work: draw, scan, fold in.

    Pure and jit-able (``num_steps``, static, default K, sets the block's
    length). :meth:`run` calls it between the period-work functions
    (:meth:`refresh`, :meth:`deliver`, :meth:`submit`) at the block
    boundaries the static schedule names, so no ``cond`` has to carry the
    O(n) sampler state (XLA copies a conditional's operands).
    """
    check_data(data, self.num_examples)
    m = self.batch_size
    self._check_step(state, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((m,) + x.shape[1:], x.dtype), data))
    drawn = self.draw(state, key, num_steps=num_steps)
    return self._block(state, data, drawn, drawn)

  def blocks(self, state: RunnerState, key: chex.PRNGKey, data: PyTree, *,
             num_blocks: int, num_steps: Optional[int] = None
             ) -> tuple[RunnerState, StepMetrics]:
    """``num_blocks`` blocks of :meth:`steps` in one program (a ``lax.scan``
    over blocks), block b with key ``fold_in(key, step)`` at its first step:
    what :meth:`run` dispatches between two period boundaries, so that the
    host issues one program per stretch instead of one (and a key) per
    block. Pure and jit-able; the metrics are concatenated over blocks."""
    def block(state, _):
      return self.steps(state, jax.random.fold_in(key, state.step), data,
                        num_steps=num_steps)
    state, metrics = jax.lax.scan(block, state, None, length=num_blocks)
    return state, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), metrics)

  def draw(self, state: RunnerState, key: chex.PRNGKey, *,
           num_steps: Optional[int] = None):
    """The next block's draw (K steps, or ``num_steps``): a
    :class:`~rais_jax.block_sampler.Sample` whose ``indices`` (K, m) a loader
    fetches (:meth:`fed_steps`); Selective-Backprop's candidates otherwise."""
    k = self.block_size if num_steps is None else num_steps
    return self._lib.draw(self.config, state.sampler, key, (k, self.batch_size))

  def fed_steps(self, state: RunnerState, drawn: bs.Sample, batches: PyTree
                ) -> tuple[RunnerState, StepMetrics]:
    """The steps of a block on batches the caller loaded: ``batches`` has
    leading axes (K, m) and holds the examples at ``drawn.indices`` (from
    :meth:`draw`), e.g. read from a NumPy memmap on the host. Pure and
    jit-able; :meth:`run` does this when its ``data`` is a loader."""
    if self.config.kind in _NEED_ALL_DATA:
      raise ValueError(_NEED_ALL_DATA[self.config.kind])
    k, m = drawn.indices.shape
    for leaf in jax.tree.leaves(batches):
      if leaf.shape[:2] != (k, m):
        raise ValueError(f"batches must have leading axes (K, m) = {(k, m)}, "
                         f"those of drawn.indices; got {leaf.shape}.")
    self._check_step(state, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batches))
    return self._block(state, None, drawn, (drawn, batches))

  def _check_step(self, state: RunnerState, batch: PyTree) -> None:
    """Trace-time checks of the optimizer, and of the loss on one batch's
    shapes (``jax.ShapeDtypeStruct`` leaves)."""
    if self.config.measures:
      check_gain_ratio_consumed(self.optimizer, state.params)
    norms_lib.check_loss_fn(self._loss_fn, state.params, batch)

  def _block(self, state: RunnerState, data: Optional[PyTree], drawn, xs
             ) -> tuple[RunnerState, StepMetrics]:
    """Scan the block's steps over ``xs`` and fold the measurements in."""
    cfg, k = self.config, drawn.indices.shape[0]
    stepwise = state.sampler if cfg.kind == "selective" else None
    carry = (state.params, state.opt_state, state.moments, state.skipped_steps,
             stepwise)
    carry, (measured, metrics) = self._scan(data, state.sampler, carry, xs)
    params, opt_state, moments, skipped, stepwise = carry
    sampler = state.sampler if stepwise is None else stepwise
    return RunnerState(
        params=params, opt_state=opt_state,
        sampler=self._lib.fold_in(cfg, sampler, drawn, measured),
        moments=moments, step=state.step + k, skipped_steps=skipped), metrics

  def refresh(self, state: RunnerState, data: PyTree) -> RunnerState:
    """O-SGD: recompute the oracle's exact norms of all n examples."""
    return state.replace(sampler=self._refresh_oracle(state.sampler, state.params,
                                                      data))

  def plan(self, state: RunnerState, key: chex.PRNGKey) -> RunnerState:
    """InfoBatch: the next epoch's examples, order and weights (from ``key``
    and the epoch's number)."""
    # (InfoBatch's blocks draw no random numbers, so sharing the run's key
    # stream, fold_in(key, ·), with them correlates nothing.)
    key = jax.random.fold_in(key, state.sampler.epoch)
    return state.replace(sampler=selection.plan(self.config, state.sampler, key))

  def deliver(self, state: RunnerState, solved: Optional[tuple] = None
              ) -> RunnerState:
    """Applies the (PT) result due now (``solved``; None solves in-graph)."""
    cfg = self.config
    if solved is None:
      solved = pt_service.solve(*state.sampler.pending.solve_args(),
                                max_iters=cfg.pt_max_iters)
    return state.replace(sampler=bs.deliver(cfg, state.sampler, solved))

  def submit(self, state: RunnerState) -> RunnerState:
    """Snapshots D for (PT), due ``pt_delay`` steps from now, if D is full.

    Skipped (non-finite) measurements can leave D short of full at a period
    boundary: then nothing is submitted until the next one.
    """
    s = state.sampler
    new = bs.submit(self.config, s, state.step + self.pt_delay)
    full = records_lib.is_full(s.records)
    pending = jax.tree.map(lambda a, b: jnp.where(full, a, b), new.pending,
                           s.pending)
    return state.replace(sampler=s.replace(pending=pending))

  def _submit_snapshot(self, state: RunnerState
                       ) -> tuple[RunnerState, tuple[bs.PendingSolve, chex.Array]]:
    """:meth:`submit`, and the snapshot it holds with its fingerprint as
    separate buffers: the next block donates the state, not these, so the
    host can read them while that block runs."""
    state = self.submit(state)
    pending = state.sampler.pending
    return state, (pending, pt_service.fingerprint(pending))

  def _deliver_and_snapshot(self, state: RunnerState, solved: tuple
                            ) -> tuple[RunnerState, tuple[bs.PendingSolve, chex.Array]]:
    """:meth:`deliver` then :meth:`_submit_snapshot`, one program: with the
    default delay every period boundary does both."""
    return self._submit_snapshot(self.deliver(state, solved))

  def _hand_over(self, snapshot: bs.PendingSolve, fingerprint: chex.Array,
                 due: int, *more: chex.Array) -> tuple[Optional[tuple], list]:
    """Reads the snapshot :meth:`_submit_snapshot` took (with ``more``, in the
    same host read) and gives it to the service if it is a new one, due at
    step ``due`` (D was full). Returns (its key or None, ``more`` on the host)."""
    service = self.service
    assert service is not None  # only runners with (PT) take snapshots
    key, args, host = service.read(fingerprint, snapshot, *more)
    if key[2] != due:
      return None, host
    service.submit_host(key, args)
    return key, host

  def _host_view(self, state: RunnerState) -> tuple[int, int, Optional[tuple]]:
    """(step, skipped steps, key of the (PT) solve in flight or None) of
    ``state``: what the last :meth:`run` returned it with if ``state`` holds
    the same arrays (so a run continuing from it reads nothing at its start),
    else read in one program and one host read. A restored state's solve
    that the service does not hold is submitted."""
    watched = self._watched(state)
    last = self._returned
    if last is not None and all(r() is a for r, a in zip(last[0], watched)):
      step, skipped, in_flight = last[1]
    else:
      step, skipped, *fp = (int(v) for v in jax.device_get(
          pt_service.local(self._jitted["_header"](state))))
      in_flight = tuple(fp) if fp and fp[2] > step else None
    service = self.service
    if in_flight is not None and service is not None and in_flight not in service:
      service.submit(state.sampler.pending)  # restored, or dropped by close()
    return step, skipped, in_flight

  def _watched(self, state: RunnerState) -> tuple:
    """The arrays :meth:`_host_view`'s values are read from."""
    pending = (state.sampler.pending.norms, state.sampler.pending.probs,
               state.sampler.pending.due) if self.service is not None else ()
    return (state.step, state.skipped_steps, *pending)

  def _header(self, state: RunnerState) -> chex.Array:
    """[step, skipped steps, fingerprint of the pending snapshot (PT only)]."""
    head = jnp.stack([state.step, state.skipped_steps]).astype(jnp.int32)
    if self.service is None:
      return head
    return jnp.concatenate([head, pt_service.fingerprint(state.sampler.pending)])

  def _refresh_due(self, step) -> Any:
    return step % self.oracle_period == 0

  def block(self, state: RunnerState, key: chex.PRNGKey, data: PyTree,
            solved: Optional[tuple] = None) -> tuple[RunnerState, StepMetrics]:
    """A whole block with its period work (as ``lax.cond``): pure, jit-able.

    What :meth:`run` does for one block, in one function, e.g. to
    ``lax.scan`` over blocks in a single program (then pass no ``solved``:
    (PT) is solved in-graph).

    Args:
      state: a :class:`RunnerState` at a block boundary.
      key: this block's key (``run`` uses ``fold_in(key, step)``).
      data: the training set, leading axis n, on device.
      solved: the (c, d, info) of the (PT) solve due at the end of this
        block; None solves it in-graph.

    Returns:
      The state after K steps and the K steps' :class:`StepMetrics`.
    """
    if self.config.kind == "oracle":
      state = jax.lax.cond(self._refresh_due(state.step),
                           lambda s: self.refresh(s, data), lambda s: s, state)
    state, metrics = self.steps(state, key, data)
    if self.pt_enabled:
      state = jax.lax.cond(state.sampler.pending.due == state.step,
                           lambda s: self.deliver(s, solved), lambda s: s, state)
      state = jax.lax.cond(state.step % self.pt_period == 0, self.submit,
                           lambda s: s, state)
    return state, metrics

  # -- host driver ---------------------------------------------------------

  def _breaks(self) -> list[int]:
    """Steps (mod :attr:`_break_period`) at which :meth:`run` returns to the
    host between blocks: (PT) snapshots and deliveries, oracle refreshes."""
    if self.pt_enabled:
      return sorted({0, self.pt_delay % self.pt_period})
    return [0] if self.config.kind == "oracle" else []

  @property
  def _break_period(self) -> int:
    return self.pt_period if self.pt_enabled else self.oracle_period

  def _gaps(self) -> set[int]:
    """Numbers of blocks between consecutive breaks; without breaks, the
    whole blocks of an epoch (n // m steps: :meth:`run_epoch`)."""
    breaks, k = self._breaks(), self.block_size
    if not breaks:
      return {self.num_examples // self.batch_size // k}
    ends = breaks[1:] + [b + self._break_period for b in breaks[:1]]
    return {(b - a) // k for a, b in zip(breaks, ends)}

  def _schedule(self, step: int, num_steps: int, also_at: tuple[int, ...] = ()
                ) -> list[tuple[int, int]]:
    """(number of blocks, block length) of each program :meth:`run` issues
    (``also_at``: more steps to stop at, e.g. a restored state's due solve).

    Whole blocks run in stretches up to the next break (one program each);
    a stretch as long as the gap between two breaks (without breaks: an
    epoch) is one program, others are split into powers of two blocks (few
    programs to compile for runs that start or end between breaks). Then the
    rest, shorter than K, in single blocks of powers of two (at most
    log₂ K + 1 programs).
    """
    k = self.block_size
    end = step + num_steps - num_steps % k
    breaks, period, gaps = self._breaks(), self._break_period, self._gaps()
    out = []
    while step < end:
      stop = min([end] + [s for s in also_at if s > step and (s - step) % k == 0])
      if breaks:
        base = step - step % period
        stop = min(stop, min(base + b for b in breaks + [breaks[0] + period]
                             if base + b > step))
      count = (stop - step) // k
      out += [(count, k)] if count in gaps else [(c, k) for c in _binary(count)]
      step = stop
    return out + [(1, n) for n in _binary(num_steps % k)]

  def run(self, state: RunnerState, key: chex.PRNGKey,
          data: PyTree | Callable[[np.ndarray], PyTree],
          num_steps: int) -> tuple[RunnerState, StepMetrics]:
    """``num_steps`` steps in blocks of K, with the period work at the block
    boundaries of the static schedule and (PT) solves handed to the service;
    the blocks between two boundaries run as one program (:meth:`blocks`).

    ``data`` is the training set on device (leading axis n), or a loader:
    a function from a block's indices, a NumPy (K, m) array, to that
    block's batches (leading axes (K, m)), e.g. rows of a memmap on disk.
    With a loader the host reads each block's indices, calls it, and feeds
    the batches to :meth:`fed_steps` (the device waits while it loads).
    RAIS with (PT) and O-SGD run whole blocks only (``num_steps`` a multiple
    of K); the other methods end with shorter blocks where needed.
    ``state`` is donated (its buffers are reused in place): continue from
    the returned state. The host reads the device once at the end of a call
    (the skipped steps, with the last (PT) snapshot), once per further (PT)
    period (the snapshot, after the next program is dispatched, so the
    device does not wait for it), and at the start only if ``state`` is not
    the one the last call returned (its step); otherwise it only
    dispatches.
    """
    k = self.block_size
    loader = data if callable(data) else None
    if loader is not None and self.config.kind in _NEED_ALL_DATA:
      raise ValueError(_NEED_ALL_DATA[self.config.kind])
    step, skipped, due_key = self._host_view(state)
    if self.whole_blocks and num_steps % k:
      raise ValueError(f"num_steps ({num_steps}) must be a multiple of the "
                       f"block size K = {k}.")
    if self.whole_blocks and step % k:
      raise ValueError(f"state.step ({step}) is not at a block boundary of K = {k}.")
    jitted = self._jitted
    metrics = []
    # A snapshot taken at a period boundary is handed to the service only
    # after the next block is dispatched: reading it waits for the snapshot,
    # not for that block, so the device never idles for the host.
    taken = None
    # A state from elsewhere (a checkpoint) may have its solve due off this
    # runner's boundaries: stop there too.
    schedule = self._schedule(step, num_steps,
                              also_at=() if due_key is None else (due_key[2],))
    if loader is not None:  # the host loads every block
      schedule = [(1, length) for count, length in schedule for _ in range(count)]
    for count, length in schedule:
      if self.config.kind == "oracle" and self._refresh_due(step):
        state = jitted["refresh"](state, data)
      if loader is None:
        state, block_metrics = jitted["blocks"](state, key, data, num_blocks=count,
                                                num_steps=length)
      else:
        drawn = jitted["draw"](state, jax.random.fold_in(key, step), num_steps=length)
        state, block_metrics = jitted["fed_steps"](
            state, drawn, loader(np.asarray(drawn.indices)))
      metrics.append(block_metrics)
      step += count * length
      if self.service is None:
        continue
      if taken is not None:
        due_key = self._hand_over(*taken)[0] or due_key
        taken = None
      solved = None
      if due_key is not None and due_key[2] == step:
        solved = self.service.take(due_key, (state.sampler.c, state.sampler.d))
        due_key = None
      if step % self.pt_period == 0:
        state, snapshot = (jitted["_submit_snapshot"](state) if solved is None else
                           jitted["_deliver_and_snapshot"](state, solved))
        taken = (*snapshot, step + self.pt_delay)
      elif solved is not None:
        state = jitted["deliver"](state, solved)
    # The run's one host read (besides loaders and mid-run snapshots): the
    # skipped steps, with the last snapshot if one was taken.
    if taken is not None:
      new_key, (skipped_now,) = self._hand_over(*taken, state.skipped_steps)
      due_key = new_key or due_key
    else:
      skipped_now = jax.device_get(pt_service.local(state.skipped_steps))
    skipped_now = int(skipped_now)
    self._returned = (tuple(map(weakref.ref, self._watched(state))),
                      (step, skipped_now, due_key))
    newly_skipped = skipped_now - skipped
    if newly_skipped:
      which = (f"every one of the {num_steps} steps was" if newly_skipped == num_steps
               else f"{newly_skipped} of the {num_steps} steps were")
      warnings.warn(
          f"{which} skipped: the loss or gradient was not finite (NaN or inf in the "
          "inputs, labels outside the model's classes, or divergence: then "
          "lower the learning rate). RunnerState.skipped_steps counts them.",
          RuntimeWarning, stacklevel=2)
    return state, metrics[0] if len(metrics) == 1 else jitted["concat"](metrics)

  def run_epoch(self, state: RunnerState, key: chex.PRNGKey,
                data: PyTree | Callable[[np.ndarray], PyTree]
                ) -> tuple[RunnerState, StepMetrics]:
    """One epoch: n // m steps of :meth:`run`; for InfoBatch the epoch it
    plans first (its pruned data: one read of the step count)."""
    num_steps = self.num_examples // self.batch_size
    if self.config.kind == "infobatch":
      state = self._jitted["plan"](state, key)
      num_steps = int(state.sampler.epoch_steps)
    return self.run(state, key, data, num_steps)

  def warm_up(self, params: PyTree, data: PyTree) -> None:
    """Compiles the programs of epoch-by-epoch training (:meth:`run_epoch`
    from step 0: the stretches of blocks at each phase of an epoch in the
    (PT) period and the joining of their metrics; stretches of powers of two
    blocks for runs that stop early; the period work and the (PT) solver;
    InfoBatch's plan and shorter blocks), on a throwaway state, so that
    timing such a run afterwards does not include compilation."""
    k, epoch = self.block_size, max(self.num_examples // self.batch_size, 1)
    period = self._break_period if self._breaks() else epoch
    schedules = [self._schedule(e * epoch % period, epoch)
                 for e in range(period // math.gcd(epoch, period))]
    programs = {p for sched in schedules for p in sched} | {
        (c, k) for c in _powers_of_two(max(self._gaps()))}
    state = self.init(params)
    if self.config.kind == "infobatch":  # its epochs vary in length
      state = self._jitted["plan"](state, jax.random.key(0))
      programs |= {(1, n) for n in _powers_of_two(k - 1)}
    metrics = {}
    for count, length in sorted(programs):
      state, metrics[count, length] = self._jitted["blocks"](
          state, jax.random.key(0), data, num_blocks=count, num_steps=length)
    for sched in schedules:
      if len(sched) > 1:
        self._jitted["concat"]([metrics[p] for p in sched])
    if self.config.kind == "oracle":
      state = self._jitted["refresh"](state, data)
    if self.service is not None:
      state, (pending, _) = self._jitted["_submit_snapshot"](state)
      solved = self.service.take(self.service.submit(pending),
                                 (state.sampler.c, state.sampler.d))
      if self.pt_delay % self.pt_period:  # deliveries off the snapshots
        state = self._jitted["deliver"](state, solved)
      state, _ = self._jitted["_deliver_and_snapshot"](state, solved)
    for start in (self.init(params), state):  # runs from states it did not return
      self._jitted["_header"](start)
    jax.block_until_ready(state)

  def close(self) -> None:
    """Drops (PT) results not yet applied (they are re-solved if needed)."""
    self._returned = None
    if self.service is not None:
      self.service.close()

  def __enter__(self) -> "Runner":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _binary(count: int) -> list[int]:
  """``count`` as a sum of powers of two, largest first (13 → [8, 4, 1])."""
  return [1 << b for b in reversed(range(count.bit_length())) if count >> b & 1]


def _powers_of_two(top: int) -> list[int]:
  """Every power of two up to ``top`` (the parts :func:`_binary` may use)."""
  return [1 << b for b in range(top.bit_length())]


def make_runner(model_fn: ModelFn, loss_head: LossHead,
                optimizer: optax.GradientTransformationExtraArgs,
                sampler: Sampler, *, norms: Optional[str] = "exact",
                block_size: int = 32, exact_method: str = "ghost",
                oracle_period: int = 1, oracle_chunk_size: Optional[int] = None,
                batch_sharding: Optional[jax.sharding.Sharding] = None,
                pt_device: Optional[jax.Device] = None) -> Runner:
  """The fast path for U-SGD, RAIS-SGD and O-SGD: blocks of K steps.

  Args:
    model_fn: ``(params, batch) -> outputs`` (e.g. logits).
    loss_head: ``(outputs, batch) -> (m,)`` per-example losses.
    optimizer: as for :func:`rais_jax.make_train_step`: its updates must use
      the ``gain_ratio`` extra argument for RAIS and O-SGD.
    sampler: as for :func:`rais_jax.make_train_step` (the runner reads its
      configuration), or one of the baselines of :mod:`rais_jax.experiments.compare`:
      :func:`rais_jax.naive_sampler`, :func:`rais_jax.loss_sampler`,
      :func:`rais_jax.selective_backprop`, :func:`rais_jax.infobatch` (train
      InfoBatch with :meth:`Runner.run_epoch`: it plans each epoch).
    norms: ``"exact"`` (default; ghost norms, the exact gain ratio) or
      ``"proxy"`` (the scale-free gain ratio), as for
      :func:`rais_jax.make_train_step`, for RAIS, O-SGD and naive; the
      uniform, loss, Selective-Backprop and InfoBatch samplers measure none.
    block_size: K, steps per block: the sampler's work happens once per
      block. The (PT) period and delay and the oracle's refresh period are
      rounded up to multiples of K. Blocks longer than half the (PT) period
      get a warning (measured on MNIST-1D: K = 25 of a 125-step period
      needed as many epochs as K = 1; K = 125 diverged).
    exact_method: how exact norms are computed: ``"ghost"`` (default; one
      backward pass, deterministic), ``"vmap"``, or ``"auto"``: the faster of
      the two for this model and batch, measured once when the first block is
      traced (:func:`rais_jax.choose_method`; the choice is in
      :attr:`Runner.chosen_methods`; pass it by name where runs in separate
      processes must be bit-identical, e.g. a resumed checkpoint).
    oracle_period: O-SGD refreshes all n exact norms every this many steps
      (rounded up to a multiple of K).
    oracle_chunk_size: examples per chunk of that refresh (default m).
    batch_sharding: data parallelism, as for :func:`rais_jax.make_train_step`;
      asynchronous (PT) works over a mesh here (the solve runs outside the
      training program).
    pt_device: where (PT) solves run (default: the host's first CPU device).

  Returns:
    A :class:`Runner`.
  """
  norms = check_norms(norms, exact_method, sampler)
  if block_size < 1:
    raise ValueError(f"block_size must be ≥ 1; got {block_size}.")
  if oracle_period < 1:
    raise ValueError(f"oracle_period must be ≥ 1; got {oracle_period}.")
  config = sampler.config
  if config.kind == "rais" and config.pt_period and block_size > config.pt_period / 2:
    warnings.warn(
        f"block_size {block_size} is more than half the (PT) period "
        f"({config.pt_period} steps): every block samples from the distribution "
        "at its start, and with blocks as long as a period RAIS diverged on "
        "MNIST-1D (every seed; up to a fifth of the period matched K = 1). "
        "Use a smaller block_size.", stacklevel=2)
  m = sampler.batch_size
  return Runner(model_fn=model_fn, loss_head=loss_head, optimizer=optimizer,
                sampler=sampler, norms=norms, block_size=block_size,
                exact_method=exact_method, oracle_period=oracle_period,
                oracle_chunk_size=m if oracle_chunk_size is None else oracle_chunk_size,
                batch_sharding=batch_sharding, pt_device=pt_device)
