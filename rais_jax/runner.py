"""The fast path's host driver: run the next program, hand (PT) what the boundary produced.

:func:`make_runner` builds a :class:`Runner` from the one step
(:mod:`rais_jax.step`), its block programs (:mod:`rais_jax.programs`) and the
static schedule of breaks (:mod:`rais_jax.schedule`). :meth:`Runner.run`
issues the programs the schedule names (the blocks between two breaks are
one program, since every program the host issues costs the host time that a
small step on an accelerator does not hide) and, at each break, the period work: the oracle's refresh, and the
(PT) hand-off through :class:`rais_jax.pt.handoff.HostHandoff` (each snapshot
solved on the host CPU while training goes on; with ``pt_mode="sync"`` the
service waits for each solve; the two give bit-identical runs).
:meth:`Runner.run_epoch` runs an epoch (or the epoch a sampler plans).

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax.augment import Augment
from rais_jax.measure import LossHead
from rais_jax.model import ModelFn, StatefulModel
from rais_jax.programs import BlockPrograms, needs_all_data
from rais_jax.pt import handoff
from rais_jax.pt import service as pt_service
from rais_jax.sampler import Sampler
from rais_jax.schedule import Schedule, in_blocks, one_block_each, powers_of_two
from rais_jax.step import StepMetrics, StepSpec, TrainState

PyTree = Any


class Compiled(NamedTuple):
  """A runner's jitted programs (the state argument donated: the O(n) sampler
  arrays are updated in place)."""

  blocks: Callable[..., Any]
  fed_steps: Callable[..., Any]
  draw: Callable[..., Any]
  refresh: Callable[..., Any]
  plan: Callable[..., Any]
  deliver: Callable[..., Any]
  snapshot: Callable[..., Any]
  deliver_and_snapshot: Callable[..., Any]
  header: Callable[..., Any]
  concat: Callable[..., Any]  # joins the metrics of a run's programs

  @classmethod
  def of(cls, programs: BlockPrograms) -> "Compiled":
    donated = lambda fn, **kw: jax.jit(fn, donate_argnums=0, **kw)
    return cls(
        blocks=donated(programs.blocks, static_argnames=("num_blocks", "num_steps")),
        fed_steps=donated(programs.fed_steps),
        draw=jax.jit(programs.draw, static_argnames="num_steps"),
        refresh=donated(programs.refresh), plan=donated(programs.plan),
        deliver=donated(programs.deliver), snapshot=donated(programs.snapshot),
        deliver_and_snapshot=donated(programs.deliver_and_snapshot),
        header=jax.jit(programs.header),
        # One program, not eager concatenations (a dispatch per field).
        concat=jax.jit(lambda parts: jax.tree.map(lambda *x: jnp.concatenate(x),
                                                  *parts)))


class Runner:
  """Built by :func:`make_runner`: ``init``, the host driver ``run`` /
  ``run_epoch`` / ``warm_up``, and the pure block programs in ``programs``.

  Attributes:
    programs: the :class:`~rais_jax.programs.BlockPrograms` (pure, jit-able:
      ``steps``, ``blocks``, ``block``, ``draw``, ``fed_steps``, ...).
    schedule: the static :class:`~rais_jax.schedule.Schedule` of breaks.
    compiled: the jitted programs :meth:`run` issues (:class:`Compiled`).
    block_size: K, steps per block.
    pt_period, pt_delay: the (PT) schedule in steps (multiples of K).
    service: the (PT) :class:`~rais_jax.pt.service.SolveService`, or None.
    chosen_methods: with ``exact_method="auto"``, the measured method per shape.
  """

  def __init__(self, programs: BlockPrograms, schedule: Schedule,
               service: Optional[pt_service.SolveService]):
    self.programs, self.schedule, self.service = programs, schedule, service
    self.sampler = programs.sampler
    self.block_size = programs.block_size
    self.pt_period, self.pt_delay = programs.pt_period, programs.pt_delay
    self.chosen_methods = programs.spec.chosen_methods
    self._handoff = handoff.HostHandoff(service)
    self.compiled = Compiled.of(programs)

  def init(self, params: PyTree, model_state: PyTree = ()) -> TrainState:
    """A fresh state holding a copy of ``params`` (and a
    :class:`~rais_jax.StatefulModel`'s ``model_state``; :meth:`run` donates it)."""
    return self.programs.init(params, model_state)

  def gain_ratio(self, state: TrainState) -> chex.Array:
    """r the next step will use."""
    return self.programs.spec.gain_ratio(state.moments)

  def exact_gain_ratio(self, state: TrainState, data: PyTree, *,
                       chunk_size: int = 1024) -> gain_ratio_lib.ExactGainRatio:
    """See :meth:`rais_jax.programs.BlockPrograms.exact_gain_ratio`."""
    return self.programs.exact_gain_ratio(state, data, chunk_size=chunk_size)

  def sampled_gain_ratio(self, state: TrainState, data: PyTree, key: chex.PRNGKey,
                         *, draws: int = 64) -> gain_ratio_lib.SampledGainRatio:
    """See :meth:`rais_jax.programs.BlockPrograms.sampled_gain_ratio`."""
    return self.programs.sampled_gain_ratio(state, data, key, draws=draws)

  def run(self, state: TrainState, key: chex.PRNGKey,
          data: PyTree | Callable[[np.ndarray], PyTree],
          num_steps: int) -> tuple[TrainState, StepMetrics]:
    """``num_steps`` steps in blocks of K, with the period work at the breaks
    of the static schedule and (PT) solves handed to the service.

    ``data`` is the training set on device (leading axis n), or a loader:
    a function from a block's indices, a NumPy (K, m) array, to that
    block's batches (leading axes (K, m)), e.g. rows of a memmap on disk.
    With a loader the host reads each block's indices, calls it, and feeds
    the batches to the block (the device waits while it loads). Samplers
    with period work run whole blocks only (``num_steps`` a multiple of K);
    the others end with shorter blocks where needed. ``state`` is donated:
    continue from the returned state. The host reads the device once at the
    end of a call (the skipped steps, with the last (PT) snapshot), once per
    further (PT) period (the snapshot, after the next program is
    dispatched, so the device does not wait for it), and at the start only
    if ``state`` is not the one the last call returned.
    """
    k, sched, smp = self.block_size, self.schedule, self.sampler
    loader = data if callable(data) else None
    if loader is not None and smp.needs_all_data:
      raise ValueError(needs_all_data(smp.name))
    step, skipped, due_key = self._handoff.view(state, self.compiled.header)
    if sched.whole_blocks and num_steps % k:
      raise ValueError(f"num_steps ({num_steps}) must be a multiple of the "
                       f"block size K = {k}.")
    if sched.whole_blocks and step % k:
      raise ValueError(f"state.step ({step}) is not at a block boundary of K = {k}.")
    metrics = []
    # A snapshot taken at a break is handed to the service only after the
    # next program is dispatched: reading it waits for the snapshot, not
    # for that program, so the device never idles for the host.
    taken = None
    # A state from elsewhere (a checkpoint) may have its solve due off this
    # runner's breaks: stop there too.
    programs = sched.programs(step, num_steps,
                              also_at=() if due_key is None else (due_key[2],))
    if loader is not None or self.programs.spec.unroll:
      # The host loads every block; or the steps are unrolled, and a scan
      # over blocks would put them back in a loop.
      programs = one_block_each(programs)
    for count, length in programs:
      if smp.refresh is not None and self.programs.refresh_due(step):
        state = self.compiled.refresh(state, data)
      if loader is None:
        state, part = self.compiled.blocks(state, key, data, num_blocks=count,
                                   num_steps=length)
      else:
        block_key = jax.random.fold_in(key, step)
        drawn = self.compiled.draw(state, block_key, num_steps=length)
        state, part = self.compiled.fed_steps(state, drawn,
                                              loader(np.asarray(drawn.indices)),
                                              block_key)
      metrics.append(part)
      step += count * length
      if self.service is None:
        continue
      if taken is not None:
        due_key = self._handoff.hand_over(*taken)[0] or due_key
        taken = None
      state, taken, due_key = self._period_work(state, step, due_key)
    # The run's one host read (besides loaders and mid-run snapshots): the
    # skipped steps, with the last snapshot if one was taken.
    if taken is not None:
      new_key, (skipped_now,) = self._handoff.hand_over(*taken, state.skipped_steps)
      due_key = new_key or due_key
    else:
      skipped_now = jax.device_get(pt_service.local(state.skipped_steps))
    skipped_now = int(skipped_now)
    self._handoff.remember(state, step, skipped_now, due_key)
    _warn_skipped(skipped_now - skipped, num_steps)
    return state, metrics[0] if len(metrics) == 1 else self.compiled.concat(metrics)

  def _period_work(self, state: TrainState, step: int, due_key: Optional[tuple]
                   ) -> tuple[TrainState, Optional[tuple], Optional[tuple]]:
    """At ``step``: apply the solve due now, snapshot D at a period boundary.
    Returns (state, the snapshot taken or None, the key still in flight)."""
    solved = None
    if due_key is not None and due_key[2] == step:
      solved = self._handoff.take(due_key, (state.sampler.c, state.sampler.d))
      due_key = None
    if step % self.pt_period == 0:
      state, snapshot = (self.compiled.snapshot(state) if solved is None else
                         self.compiled.deliver_and_snapshot(state, solved))
      return state, (*snapshot, step + self.pt_delay), due_key
    if solved is not None:
      state = self.compiled.deliver(state, solved)
    return state, None, due_key

  def run_epoch(self, state: TrainState, key: chex.PRNGKey,
                data: PyTree | Callable[[np.ndarray], PyTree]
                ) -> tuple[TrainState, StepMetrics]:
    """One epoch: n // m steps of :meth:`run`; for a sampler that plans
    epochs (InfoBatch) the epoch it plans first (one read of its length)."""
    smp = self.sampler
    num_steps = smp.num_examples // smp.batch_size
    if smp.plan_epoch is not None:
      assert smp.epoch_steps is not None  # a planning sampler says its epoch's length
      state = self.compiled.plan(state, key)
      num_steps = int(smp.epoch_steps(state.sampler))
    return self.run(state, key, data, num_steps)

  def warm_up(self, params: PyTree, data: PyTree, model_state: PyTree = ()) -> None:
    """Compiles the programs of epoch-by-epoch training (:meth:`run_epoch`
    from step 0, and runs stopping early; the period work and the (PT)
    solver; a planning sampler's plan and shorter blocks), on a throwaway
    state, so that timing such a run afterwards does not include compilation."""
    k, smp = self.block_size, self.sampler
    epochs, programs = self.schedule.epoch_programs()
    state = self.init(params, model_state)
    if smp.plan_epoch is not None:  # its epochs vary in length
      state = self.compiled.plan(state, jax.random.key(0))
      programs |= {(1, n) for n in powers_of_two(k - 1)}
    if self.programs.spec.unroll:  # run() dispatches unrolled blocks one by one
      programs = set(one_block_each(sorted(programs)))
      epochs = [one_block_each(sched) for sched in epochs]
    metrics = {}
    for count, length in sorted(programs):
      state, metrics[count, length] = self.compiled.blocks(
          state, jax.random.key(0), data, num_blocks=count, num_steps=length)
    for sched in epochs:
      if len(sched) > 1:
        self.compiled.concat([metrics[p] for p in sched])
    if smp.refresh is not None:
      state = self.compiled.refresh(state, data)
    if self.service is not None:
      state, (pending, _) = self.compiled.snapshot(state)
      solved = self.service.take(self.service.submit(pending),
                                 (state.sampler.c, state.sampler.d))
      if self.pt_delay % self.pt_period:  # deliveries off the snapshots
        state = self.compiled.deliver(state, solved)
      state, _ = self.compiled.deliver_and_snapshot(state, solved)
    for start in (self.init(params, model_state), state):  # states it did not return
      self.compiled.header(start)
    jax.block_until_ready(state)

  def close(self) -> None:
    """Drops (PT) results not yet applied (they are re-solved if needed)."""
    self._handoff.close()

  def __enter__(self) -> "Runner":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _warn_skipped(newly_skipped: int, num_steps: int) -> None:
  if not newly_skipped:
    return
  which = (f"every one of the {num_steps} steps was" if newly_skipped == num_steps
           else f"{newly_skipped} of the {num_steps} steps were")
  warnings.warn(
      f"{which} skipped: the loss or gradient was not finite (NaN or inf in the "
      "inputs, labels outside the model's classes, or divergence: then "
      "lower the learning rate). TrainState.skipped_steps counts them.",
      RuntimeWarning, stacklevel=3)


def make_runner(model_fn: ModelFn | StatefulModel, loss_head: LossHead,
                optimizer: optax.GradientTransformationExtraArgs,
                sampler: Sampler, *, norms: Optional[str] = "auto",
                block_size: int = 32, exact_method: str = "ghost",
                oracle_period: int = 1, oracle_chunk_size: Optional[int] = None,
                batch_sharding: Optional[jax.sharding.Sharding] = None,
                pt_device: Optional[jax.Device] = None,
                augment: Optional[Augment] = None, unroll: bool = False) -> Runner:
  """The fast path for any :class:`~rais_jax.Sampler`: blocks of K steps.

  Args:
    model_fn: ``(params, batch) -> outputs`` (e.g. logits), or a
      :class:`~rais_jax.StatefulModel` (BatchNorm, dropout; its state goes
      in :meth:`Runner.init`; see :mod:`rais_jax.model`).
    loss_head: ``(outputs, batch) -> (m,)`` per-example losses.
    optimizer: as for :func:`rais_jax.make_train_step`: its updates must use
      the ``gain_ratio`` extra argument for samplers that raise the
      learning rate (RAIS, O-SGD, naive).
    sampler: any :class:`~rais_jax.Sampler` (train one that plans epochs,
      such as InfoBatch, with :meth:`Runner.run_epoch`).
    norms: ``"auto"`` (default), ``"exact"`` (ghost norms, the exact gain
      ratio) or ``"proxy"`` (the scale-free gain ratio), as for
      :func:`rais_jax.make_train_step`, for samplers that measure norms.
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
    oracle_period: a sampler with ``refresh`` (O-SGD) gets the exact norms of
      all n examples every this many steps (rounded up to a multiple of K).
    oracle_chunk_size: examples per chunk of that refresh (default m).
    batch_sharding: data parallelism, as for :func:`rais_jax.make_train_step`;
      asynchronous (PT) works over a mesh here (the solve runs outside the
      training program).
    pt_device: where (PT) solves run (default: the host's first CPU device).
    augment: ``augment(key, example) -> example``, applied on device to each
      example of every step (:mod:`rais_jax.augment`), after the gather or
      the loader's fetch.
    unroll: compile each block's K steps unrolled (and dispatch blocks one
      by one) instead of as a loop. For convolutional models on CPU: XLA:CPU
      runs convolutions inside a loop body several times slower than
      outside one (jax-ml/jax#12868; the CHANGELOG has the measurement), at
      the price of K times the compilation.

  Returns:
    A :class:`Runner`.
  """
  spec = StepSpec(model_fn, loss_head, optimizer, sampler, norms=norms,
                  exact_method=exact_method, batch_sharding=batch_sharding,
                  augment=augment, unroll=unroll)
  if block_size < 1:
    raise ValueError(f"block_size must be ≥ 1; got {block_size}.")
  if oracle_period < 1:
    raise ValueError(f"oracle_period must be ≥ 1; got {oracle_period}.")
  pt = sampler.pt
  if pt is not None and block_size > pt.period / 2:
    warnings.warn(
        f"block_size {block_size} is more than half the (PT) period "
        f"({pt.period} steps): every block samples from the distribution "
        "at its start, and with blocks as long as a period RAIS diverged on "
        "MNIST-1D (every seed; up to a fifth of the period matched K = 1). "
        "Use a smaller block_size.", stacklevel=2)
  k = block_size
  oracle_period = in_blocks(oracle_period, k)
  programs = BlockPrograms(
      spec, block_size=k, oracle_period=oracle_period,
      oracle_chunk_size=sampler.batch_size if oracle_chunk_size is None
      else oracle_chunk_size)
  epoch = sampler.num_examples // sampler.batch_size
  if pt is not None:
    period, delay = programs.pt_period, programs.pt_delay
    schedule = Schedule(k, period, tuple(sorted({0, delay % period})), epoch)
  elif sampler.refresh is not None:
    schedule = Schedule(k, oracle_period, (0,), epoch)
  else:
    schedule = Schedule(k, k, (), epoch)
  service = None
  if pt is not None:
    service = pt_service.SolveService(max_iters=pt.max_iters, device=pt_device,
                                      wait=pt.mode == "sync")
  return Runner(programs, schedule, service)
