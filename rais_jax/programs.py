"""The fast path's device programs: blocks of K steps, and the period work between them.

A RAIS step on an accelerator is latency-bound: a plain SGD step of a small
MLP is tens of microseconds on a GPU, and every branch (``lax.cond`` reads its
predicate back to the host), host callback or chain of small ops after the
backward pass adds to it. So the fast path reorganises the step:

1. before a block, one tree descent draws the indices of all K steps, (K, m),
   with their p (the sampler's ``draw``);
2. the block is one ``lax.scan`` of the one step (:mod:`rais_jax.step`): no
   ``cond``, no ``while``, no callback in it (tested on the compiled program);
3. after the block, the K·m measurements are folded into the sampler at once;
4. at the block boundaries the schedule (:mod:`rais_jax.schedule`) names,
   separate small programs do the period work: apply a (PT) result that is
   due, snapshot D for the next solve, refresh the O-SGD oracle. No ``cond``
   carries the O(n) sampler state (XLA copies a conditional's operands).

Every weight uses the p its index was drawn from, so g_R stays unbiased; the
features and trees are up to K steps stale. Every function here is pure and
jit-able; :class:`rais_jax.Runner` compiles and drives them. The block keys
are ``fold_in(key, step)``, so a run resumed at any block boundary continues
bit-identically.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax.measure import (all_exact_norms, full_gradient, measured_gradient,
                              measured_gradient_stateful)
from rais_jax.pt import handoff
from rais_jax.pt import service as pt_service
from rais_jax.pt.snapshot import PendingSolve
from rais_jax.step import StepMetrics, StepSpec, TrainState, init_train_state, run_block

PyTree = Any


class BlockPrograms:
  """The pure programs of a fast path (see the module).

  Attributes:
    spec: the step's :class:`~rais_jax.step.StepSpec`.
    block_size: K.
    pt_period, pt_delay: the (PT) schedule in steps (multiples of K; 0 without (PT)).
    oracle_period: steps between the oracle's refreshes (a multiple of K).
  """

  def __init__(self, spec: StepSpec, *, block_size: int, oracle_period: int,
               oracle_chunk_size: int):
    self.spec, self.sampler = spec, spec.sampler
    self.block_size = block_size
    pt = self.sampler.pt
    self.pt_period: int = 0
    self.pt_delay: int = 0
    if pt is not None:
      self.pt_period, self.pt_delay = pt.in_blocks(block_size)
    self.oracle_period, self.oracle_chunk = oracle_period, oracle_chunk_size

  def init(self, params: PyTree, model_state: PyTree = ()) -> TrainState:
    """A fresh state holding a copy of ``params`` and ``model_state`` (a
    :class:`~rais_jax.StatefulModel`'s; the programs donate them).

    Every leaf is committed to the default device, as the outputs of the
    compiled programs are: otherwise the first blocks would see a different
    mix of placements than later ones and compile again mid-run. (Place it
    elsewhere, e.g. replicated over a mesh, with ``jax.device_put``.)
    """
    state = init_train_state(jax.tree.map(jnp.copy, params), self.spec.optimizer,
                             self.sampler, jax.tree.map(jnp.copy, model_state))
    return jax.device_put(state, jax.local_devices()[0])

  def _chunk_method(self, state: TrainState, data: PyTree, chunk_size: int) -> str:
    """The norm method for chunks of ``data`` (the oracle, the exact gain ratio)."""
    return self.spec.method_for(state.params, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((chunk_size,) + x.shape[1:], x.dtype), data),
                                state.model_state)

  def exact_gain_ratio(self, state: TrainState, data: PyTree, *,
                       chunk_size: int = 1024) -> gain_ratio_lib.ExactGainRatio:
    """The true gain ratio at ``state``'s parameters and sampling
    distribution: exact norms of all n examples and the full gradient (two
    passes over the data, a stateful model in inference mode; for analysis,
    e.g. against the estimate)."""
    loss_fn, smp = self.spec.eval_loss_fn(state.model_state), self.sampler
    if smp.probabilities is None:
      raise ValueError(f"the {smp.name!r} sampler has no sampling distribution.")
    norms = all_exact_norms(loss_fn, state.params, data, chunk_size=chunk_size,
                            method=self._chunk_method(state, data, chunk_size))
    grads = full_gradient(loss_fn, state.params, data, chunk_size=chunk_size)
    return gain_ratio_lib.exact(norms, smp.probabilities(state.sampler),
                                optax.tree.norm(grads, squared=True), smp.batch_size)

  def sampled_gain_ratio(self, state: TrainState, data: PyTree, key: chex.PRNGKey,
                         *, draws: int = 64) -> gain_ratio_lib.SampledGainRatio:
    """The true gain ratio of the step as it trains, by Monte Carlo.

    ``draws`` minibatches of m drawn uniformly (with replacement) and as many
    from the sampler's p (weights 1/(n p)), each with the step's
    augmentation and a training-mode model (dropout, BatchNorm's batch
    statistics; a uniform and a p-drawn batch share a key): r = mean ‖g_U‖²
    / mean ‖g_R‖², with its Monte Carlo standard error. Unlike
    :meth:`exact_gain_ratio` it assumes nothing about how a batch's examples
    combine, so it is the truth for a loss that couples them (BatchNorm).
    For analysis, not for training.
    """
    smp, spec = self.sampler, self.spec
    if smp.probabilities is None:
      raise ValueError(f"the {smp.name!r} sampler has no sampling distribution.")
    if draws < 2:
      raise ValueError(f"draws must be at least 2 (a standard error); got {draws}.")
    n, m = smp.num_examples, smp.batch_size
    probs = smp.probabilities(state.sampler)

    def sq_norm(indices, weights, step_key):
      batch, model_key = spec.prepare(spec.gather(data, indices),
                                      step_key if spec.keyed else None)
      grads = batch_gradient(spec, state.params, state.model_state, model_key,
                             batch, weights)
      return optax.tree.norm(grads, squared=True)

    def draw(key):
      uniform_key, robust_key, step_key = jax.random.split(key, 3)
      uniform = jax.random.randint(uniform_key, (m,), 0, n)
      robust = jax.random.categorical(robust_key, jnp.log(probs), shape=(m,))
      return (sq_norm(uniform, jnp.ones((m,), jnp.float32), step_key),
              sq_norm(robust, 1.0 / (n * probs[robust]), step_key))

    uniform, robust = jax.lax.map(draw, jax.random.split(key, draws))
    return gain_ratio_lib.sampled(uniform, robust)

  def draw(self, state: TrainState, key: chex.PRNGKey, *,
           num_steps: Optional[int] = None) -> Any:
    """The next block's draw (K steps, or ``num_steps``): a
    :class:`~rais_jax.Sample` whose ``indices`` (K, m) a loader fetches
    (:meth:`fed_steps`), or the candidates of a sampler that selects."""
    k = self.block_size if num_steps is None else num_steps
    return self.sampler.draw(state.sampler, key, (k, self.sampler.batch_size))

  def steps(self, state: TrainState, key: chex.PRNGKey, data: PyTree, *,
            num_steps: Optional[int] = None) -> tuple[TrainState, StepMetrics]:
    """The K steps of a block without the period work: draw, scan, fold in
    (``num_steps``, static, default K, sets the block's length)."""
    self.spec.check_on_data(state.params, data, state.model_state)
    drawn = self.draw(state, key, num_steps=num_steps)
    return run_block(self.spec, state, data, drawn, drawn, key)

  def blocks(self, state: TrainState, key: chex.PRNGKey, data: PyTree, *,
             num_blocks: int, num_steps: Optional[int] = None
             ) -> tuple[TrainState, StepMetrics]:
    """``num_blocks`` blocks of :meth:`steps` in one program (a scan over
    blocks), block b with key ``fold_in(key, step)`` at its first step: what
    the runner dispatches between two breaks. Metrics are concatenated."""
    def block(state, _):
      return self.steps(state, jax.random.fold_in(key, state.step), data,
                        num_steps=num_steps)
    if self.spec.unroll and num_blocks == 1:
      # Unrolled steps are dispatched one block at a time (Runner.run): a
      # scan of length 1 would still be a loop around them.
      return block(state, None)
    state, metrics = jax.lax.scan(block, state, None, length=num_blocks)
    return state, jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), metrics)

  def fed_steps(self, state: TrainState, drawn: Any, batches: PyTree,
                key: Optional[chex.PRNGKey] = None
                ) -> tuple[TrainState, StepMetrics]:
    """The steps of a block on batches the caller loaded: ``batches`` has
    leading axes (K, m) and holds the examples at ``drawn.indices`` (from
    :meth:`draw`), e.g. read from a NumPy memmap on the host. ``key``: the
    key the block was drawn with (a stateful model's or an augmentation's
    steps take theirs from it)."""
    if self.sampler.needs_all_data:
      raise ValueError(needs_all_data(self.sampler.name))
    k, m = drawn.indices.shape
    for leaf in jax.tree.leaves(batches):
      if leaf.shape[:2] != (k, m):
        raise ValueError(f"batches must have leading axes (K, m) = {(k, m)}, "
                         f"those of drawn.indices; got {leaf.shape}.")
    self.spec.check(state.params, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batches),
                    state.model_state)
    return run_block(self.spec, state, None, drawn, (drawn, batches), key)

  def refresh(self, state: TrainState, data: PyTree) -> TrainState:
    """The oracle: the exact norms of all n examples, handed to ``refresh``."""
    assert self.sampler.refresh is not None
    norms = all_exact_norms(
        self.spec.eval_loss_fn(state.model_state), state.params, data,
        chunk_size=self.oracle_chunk,
        method=self._chunk_method(state, data, self.oracle_chunk))
    return state.replace(sampler=self.sampler.refresh(state.sampler, norms))

  def plan(self, state: TrainState, key: chex.PRNGKey) -> TrainState:
    """The next epoch's plan, for samplers that plan epochs."""
    assert self.sampler.plan_epoch is not None
    return state.replace(sampler=self.sampler.plan_epoch(state.sampler, key))

  def deliver(self, state: TrainState, solved: Optional[tuple] = None
              ) -> TrainState:
    """Applies the (PT) result due now (``solved``; None solves in-graph)."""
    pt = self.sampler.pt
    if solved is None:
      solved = pt.solve(state.sampler.pending)
    return state.replace(sampler=pt.deliver(state.sampler, solved))

  def submit(self, state: TrainState) -> TrainState:
    """Snapshots D for (PT), due ``pt_delay`` steps from now, if D is full."""
    return state.replace(sampler=self.sampler.pt.take_if_full(
        state.sampler, state.step + self.pt_delay))

  def snapshot(self, state: TrainState
               ) -> tuple[TrainState, tuple[PendingSolve, chex.Array]]:
    """:meth:`submit`, and the snapshot it holds with its fingerprint as
    separate buffers: the next block donates the state, not these, so the
    host can read them while that block runs."""
    state = self.submit(state)
    pending = state.sampler.pending
    return state, (pending, pt_service.fingerprint(pending))

  def deliver_and_snapshot(self, state: TrainState, solved: tuple
                           ) -> tuple[TrainState, tuple[PendingSolve, chex.Array]]:
    """:meth:`deliver` then :meth:`snapshot`, one program: with the default
    delay every period boundary does both."""
    return self.snapshot(self.deliver(state, solved))

  def header(self, state: TrainState) -> chex.Array:
    return handoff.header(state, with_pt=self.sampler.pt is not None)

  def refresh_due(self, step: Any) -> Any:
    return step % self.oracle_period == 0

  def block(self, state: TrainState, key: chex.PRNGKey, data: PyTree,
            solved: Optional[tuple] = None) -> tuple[TrainState, StepMetrics]:
    """A whole block with its period work as ``lax.cond``: what the runner
    does for one block, in one pure function, e.g. to ``lax.scan`` over
    blocks in a single program (then pass no ``solved``: (PT) is solved
    in-graph).

    Args:
      state: a :class:`~rais_jax.TrainState` at a block boundary.
      key: this block's key (the runner uses ``fold_in(key, step)``).
      data: the training set, leading axis n, on device.
      solved: the (c, d, info) of the (PT) solve due at the end of this
        block; None solves it in-graph.
    """
    if self.sampler.refresh is not None:
      state = jax.lax.cond(self.refresh_due(state.step),
                           lambda s: self.refresh(s, data), lambda s: s, state)
    state, metrics = self.steps(state, key, data)
    if self.sampler.pt is not None:
      state = jax.lax.cond(state.sampler.pending.due == state.step,
                           lambda s: self.deliver(s, solved), lambda s: s, state)
      state = jax.lax.cond(state.step % self.pt_period == 0, self.submit,
                           lambda s: s, state)
    return state, metrics


def needs_all_data(name: str) -> str:
  return (f"the {name!r} sampler reads the whole training set on device (all n "
          "examples, or candidates drawn inside the step): pass the data as "
          "arrays, not a loader.")


def batch_gradient(spec: StepSpec, params: PyTree, model_state: PyTree,
                   key: Optional[chex.PRNGKey], batch: PyTree,
                   weights: chex.Array) -> PyTree:
  """(1/m) Σ_k w_k ∇f_k of one prepared batch, as the step computes it
  (training mode), without norms."""
  if spec.stateful:
    return measured_gradient_stateful(spec.model, spec.loss_head, params, model_state,
                                      key, batch, weights, norms=None)[0]
  return measured_gradient(spec.model_fn, spec.loss_head, params, batch, weights,
                           norms=None)[0]
