"""The sampler factories, and the per-step sampler API over one state pytree.

:func:`rais_sampler`, :func:`uniform_sampler` and :func:`oracle_sampler` return
a :class:`Sampler`: its ``config`` drives the fast path
(:func:`rais_jax.make_runner`, blocks of K steps, see
:mod:`rais_jax.block_sampler`), and its functions are the per-step API that
:func:`rais_jax.make_train_step` uses (the same block functions with K = 1,
plus the gain-ratio moments and the (PT) hand-off as ``lax.cond``).

The state (:class:`SamplerState`) holds everything: per-example features, a
stack of three sum-trees (over a_i = ⟨c, s_i⟩, over b_i = ⟨d, s_i⟩, and over
ones for the uniform floor), the uncertainty-set
parameters (c, d), the ring buffer D of recent measurements, the (PT) solve in
flight, the gain-ratio moments, counters and diagnostics. It lives on device, so
``jit``, ``lax.scan``, sharding and orbax checkpointing apply unchanged.

Sampling draws m i.i.d. indices from

    p_i = (1 − ε) (a_i + k b_i) / (A + k B) + ε / n,   A = Σ a, B = Σ b, k = B^(-1/2),

as a mixture: tree a with weight (1 − ε) A/(A + kB), tree b with weight
(1 − ε) kB/(A + kB), the tree of ones (uniform) with weight ε; one descent
serves all three. Until the first (PT) solution is applied, sampling is uniform.

(PT) runs every ``pt_period`` = ⌈ ``|D|`` / m ⌉ steps on a snapshot of D and its result
is applied exactly ``pt_delay`` steps later, so runs are reproducible for a
given key whether the solve ran in the background (``pt_mode="async"``: an
``io_callback`` hands the snapshot to a host thread) or in-graph
(``pt_mode="sync"``: ``lax.cond`` at the delivery step, for TPUs and tests).
A solve that fails or returns non-finite values keeps the old (c, d) and is
counted in the diagnostics.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from rais_jax import scatter, struct
from jax.experimental import io_callback

from rais_jax import block_sampler as bs
from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax import pt_service
from rais_jax import records as records_lib
from rais_jax import selection
from rais_jax.block_sampler import Diagnostics, Sample, SamplerConfig
from rais_jax.features import FeatureMap

# The kinds the per-step API (make_train_step) serves; the baselines of
# rais_jax.experiments.compare run on the fast path (make_runner) only.
PER_STEP_KINDS = ("rais", "uniform", "oracle")


@struct.dataclass
class SamplerState(bs.RobustState):
  """The fast path's :class:`~rais_jax.block_sampler.RobustState`, plus the
  gain-ratio moments and the step count that the per-step API keeps here."""

  moments: gain_ratio_lib.GainRatioState
  step: chex.Array  # int32 number of updates


class Sampler(NamedTuple):
  """Pure functions over a :class:`SamplerState` (like an optax transform).

  * ``init()`` → state.
  * ``sample(state, key)`` → :class:`Sample` of m indices.
  * ``update(state, sample, norms, *, grad_sq_norm, grad_halves_inner=None)``
    → state after measuring the sampled examples' gradient norms.
  * ``gain_ratio(state, *, scale_free=False)`` → r ∈ [1, r_max]
    (``scale_free=True`` when the measured norms are proxies).
  * ``probabilities(state)`` → p over all n examples (O(n); for analysis).
  * ``set_parameters(state, c, d)`` → state sampling from the robust
    distribution of (c, d) (trees rebuilt, O(n)); e.g. to warm-start a run.
  * ``refresh(state, norms)`` → state; oracle samplers only: p ∝ norms.
  * ``close()`` stops the worker thread of asynchronous (PT) solves, if one
    was started (the per-step path starts it with the first submission).

  ``config`` is what the factory was asked for; the fast path
  (:func:`rais_jax.make_runner`) builds its block functions from it.
  """

  init: Callable[[], SamplerState]
  sample: Callable[[SamplerState, chex.PRNGKey], Sample]
  update: Callable[..., SamplerState]
  gain_ratio: Callable[..., chex.Array]  # (state, *, scale_free=False)
  probabilities: Callable[[SamplerState], chex.Array]
  set_parameters: Callable[[SamplerState, chex.Array, chex.Array], SamplerState]
  refresh: Optional[Callable[[SamplerState, chex.Array], SamplerState]]
  num_examples: int
  batch_size: int
  feature_names: tuple[str, ...]
  pt_mode: str  # "async" or "sync" (also for samplers that never solve)
  config: SamplerConfig  # what the factory was asked for (the fast path reads it)
  close: Callable[[], None]  # stops the per-step path's (PT) worker thread, if any


def _make_sampler(config: SamplerConfig) -> Sampler:
  """The per-step sampler: the block functions of :mod:`rais_jax.block_sampler`
  with K = 1, the gain-ratio moments, and the (PT) hand-off as ``lax.cond``
  at the delivery and submission steps."""
  n, m = config.num_examples, config.batch_size
  d_r = config.feature_map.num_features
  pt_enabled = config.pt_period > 0
  solve = functools.partial(pt_service.solve, max_iters=config.pt_max_iters)
  async_pt = (pt_service.CallbackSolves(jax.jit(solve))
              if pt_enabled and config.pt_mode == "async" else None)
  result_shapes = pt_service.result_shapes(config.buffer_size, d_r)
  bind = lambda fn: functools.partial(fn, config)
  set_parameters, fold_in = bind(bs.set_parameters), bind(bs.fold_in)

  def init() -> SamplerState:
    robust_state = _placeholder_state(config) if config.kind == "uniform" else bs.init(config)
    return SamplerState(**{f.name: getattr(robust_state, f.name)
                           for f in dataclasses.fields(robust_state)},
                        moments=gain_ratio_lib.init(),
                        step=jnp.zeros((), jnp.int32))

  def sample(state: SamplerState, key: chex.PRNGKey) -> Sample:
    return bs.draw(config, state, key, (m,))

  def deliver(state: SamplerState) -> SamplerState:
    args = state.pending.solve_args()
    if async_pt is not None:
      solved = io_callback(async_pt.fetch, result_shapes, *args)
    else:
      solved = solve(*args)
    return bs.deliver(config, state, solved)

  def submit(state: SamplerState) -> SamplerState:
    state = bs.submit(config, state, state.step + config.pt_delay)
    if async_pt is not None:
      pending = state.pending
      token = io_callback(async_pt.submit, jax.ShapeDtypeStruct((), jnp.int32),
                          *pending.solve_args())
      # Tie the callback into the state so it is never dead-code eliminated.
      state = state.replace(pending=pending.replace(due=pending.due + token))
    return state

  def update(state: SamplerState, sample_: Sample, norms: chex.Array, *,
             grad_sq_norm: chex.Array,
             grad_halves_inner: Optional[chex.Array] = None) -> SamplerState:
    chex.assert_shape(norms, (m,))
    if config.kind == "uniform":
      return state.replace(step=state.step + 1)
    state = fold_in(state, sample_, norms)
    moments = gain_ratio_lib.update(
        state.moments, norms.astype(jnp.float32), sample_.probs, n,
        grad_sq_norm, grad_halves_inner=grad_halves_inner,
        alpha=config.ema_rate)
    state = state.replace(moments=moments, step=state.step + 1)
    if pt_enabled:
      state = jax.lax.cond(state.pending.due == state.step, deliver,
                           lambda s: s, state)
      # Skipped measurements (non-finite norms) can leave D short of full at
      # a period boundary; then wait for the next one rather than solve on
      # empty slots.
      due = (state.step % config.pt_period == 0) & records_lib.is_full(state.records)
      state = jax.lax.cond(due, submit, lambda s: s, state)
    return state

  def gain_ratio(state: SamplerState, *, scale_free: bool = False) -> chex.Array:
    if config.kind == "uniform":
      return jnp.ones((), jnp.float32)
    return gain_ratio_lib.estimate(state.moments, m, r_max=config.r_max,
                                   scale_free=scale_free)

  return Sampler(init=init, sample=sample, update=update, gain_ratio=gain_ratio,
                 probabilities=bind(bs.probabilities), set_parameters=set_parameters,
                 refresh=bind(bs.refresh) if config.kind == "oracle" else None,
                 num_examples=n, batch_size=m,
                 feature_names=tuple(config.feature_map.names),
                 pt_mode=config.pt_mode if async_pt is not None else "sync",
                 config=config,
                 close=async_pt.close if async_pt is not None else lambda: None)


def _placeholder_state(config: SamplerConfig) -> bs.RobustState:
  """U-SGD's per-step state: the fields of a robust one, O(1) and never read."""
  zeros = lambda: jnp.zeros((1,), jnp.float32)
  return bs.RobustState(
      features=config.feature_map.init(), **bs.rebuild_trees(config, None, None, None),
      c=zeros(), d=zeros(), fitted=jnp.zeros((), bool), records=records_lib.init(1, 1),
      pending=bs.empty_pending(1, 1, zeros(), zeros()), diagnostics=Diagnostics.zeros())


def fast_path_only(kind: str) -> str:
  return (f"the {kind!r} sampler runs on the fast path only: train with "
          "rais_jax.make_runner (make_train_step and the per-step Sampler "
          f"functions serve {', '.join(PER_STEP_KINDS)} samplers).")


def _fast_path_sampler(config: SamplerConfig) -> Sampler:
  """A baseline's Sampler: its config for make_runner; the per-step functions
  raise one clear error (``probabilities`` works for the point estimates)."""
  def unsupported(*args, **kwargs):
    raise ValueError(fast_path_only(config.kind))
  probabilities = (functools.partial(bs.probabilities, config)
                   if config.kind in bs.POINT_KINDS else unsupported)
  return Sampler(init=unsupported, sample=unsupported, update=unsupported,
                 gain_ratio=unsupported, probabilities=probabilities,
                 set_parameters=unsupported, refresh=None,
                 num_examples=config.num_examples, batch_size=config.batch_size,
                 feature_names=tuple(config.feature_map.names), pt_mode="sync",
                 config=config, close=lambda: None)


def _check_common(num_examples: int, batch_size: int, floor: float) -> None:
  if num_examples < 1:
    raise ValueError(f"the dataset must have n ≥ 1 examples; got {num_examples}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be ≥ 1; got {batch_size}.")
  if not 0.0 < floor <= 1.0:
    raise ValueError(
        f"floor must lie in (0, 1]: every p_i needs a uniform floor ε/n > 0 "
        f"for the importance weights to stay unbiased; got {floor}.")


def rais_sampler(features: FeatureMap, *, batch_size: int,
                 buffer_size: Optional[int] = None, floor: float = 1e-3,
                 pt_period: Optional[int] = None,
                 pt_delay: Optional[int] = None, pt_mode: str = "async",
                 pt_max_iters: int = 1000, ema_rate: float = 0.1,
                 r_max: Optional[float] = None) -> Sampler:
  """Robust, approximate importance sampling (RAIS).

  Args:
    features: the per-example :class:`~rais_jax.features.FeatureMap`.
    batch_size: m, the number of indices per step.
    buffer_size: ``|D|``, default min(n, 65536).
    floor: ε, the uniform share of the sampling mass.
    pt_period: steps between (PT) solves, default ⌈ ``|D|`` / m ⌉ (one refill of D).
    pt_delay: steps from a solve's submission to its application, in
      [1, pt_period]; default pt_period: an asynchronous solve has a whole
      period of training to finish in (on a GPU, the 125 steps of the
      MNIST-1D MLP take ~8 ms, a solve on the host CPU 5–30 ms), and the
      fast path applies it and takes the next snapshot at one boundary.
    pt_mode: ``"async"`` (background thread via ``io_callback``) or ``"sync"``
      (in-graph). Both give identical runs.
    pt_max_iters: iteration cap of each solve.
    ema_rate: α of the gain-ratio moving averages.
    r_max: upper clip of the gain ratio, default m.

  Returns:
    A :class:`Sampler`.
  """
  n = features.num_examples
  _check_common(n, batch_size, floor)
  buffer_size = min(n, 65536) if buffer_size is None else buffer_size
  if buffer_size < 1:
    raise ValueError(f"buffer_size must be ≥ 1; got {buffer_size}.")
  period = -(-buffer_size // batch_size) if pt_period is None else pt_period
  if period < 1:
    raise ValueError(f"pt_period must be ≥ 1; got {period}.")
  if period * batch_size < buffer_size:
    raise ValueError(
        f"pt_period ({period}) × batch_size ({batch_size}) must be ≥ "
        f"buffer_size ({buffer_size}) so that D is full at each solve.")
  delay = period if pt_delay is None else pt_delay
  if not 1 <= delay <= period:
    raise ValueError(f"pt_delay must lie in [1, pt_period={period}]; got {delay}.")
  if pt_mode not in ("async", "sync"):
    raise ValueError(f"pt_mode must be 'async' or 'sync'; got {pt_mode!r}.")
  return _make_sampler(SamplerConfig(
      kind="rais", feature_map=features, batch_size=batch_size, floor=floor,
      buffer_size=buffer_size, pt_period=period, pt_delay=delay,
      pt_mode=pt_mode, pt_max_iters=pt_max_iters, ema_rate=ema_rate,
      r_max=r_max))


def uniform_sampler(num_examples: int, *, batch_size: int) -> Sampler:
  """Plain uniform sampling with replacement and gain ratio 1 (U-SGD).

  It draws with ``jax.random.randint``, keeps no sum-trees (its state holds
  one-leaf placeholders), and its ``update`` only counts steps: the measured
  norms are ignored.
  """
  _check_common(num_examples, batch_size, 1.0)
  return _make_sampler(SamplerConfig(
      kind="uniform", feature_map=_constant_feature(num_examples),
      batch_size=batch_size, floor=1.0))


def oracle_sampler(num_examples: int, *, batch_size: int, floor: float = 0.3,
                   ema_rate: float = 0.1, r_max: Optional[float] = None) -> Sampler:
  """O-SGD: p_i ∝ v_i (with the floor) from exact norms of all n examples.

  Sampling is uniform until the first ``refresh(state, norms)`` with the
  (n,) exact norms; call it again on whatever period you choose. Between
  refreshes the norms go stale, and an example whose gradient has grown
  since gets the weight 1/(n p_i) of its old, small norm. The default floor
  ε = 0.3 (a defensive mixture: 30 % uniform) caps every weight at
  1/ε ≈ 3.3. Measured on MNIST-1D with the oracle refreshed every 10 steps
  (lr 0.1, 5 seeds): ε = 0.1 gave loss spikes early in training and reached
  U-SGD's final loss in 0/5 seeds (one ended at 3× it), ε = 0.3 in 5/5 with
  2.7× fewer epochs, ε = 0.5 in 4/5; with RAIS's ε = 1e-3 (weights up to
  1000) one seed of three diverged at lr 0.05.
  """
  _check_common(num_examples, batch_size, floor)
  oracle = FeatureMap(
      num_examples=num_examples, names=("oracle norm",),
      init=lambda: jnp.zeros((num_examples,), jnp.float32),
      compute=_one_value, update=_unchanged)
  return _make_sampler(SamplerConfig(
      kind="oracle", feature_map=oracle, batch_size=batch_size, floor=floor,
      ema_rate=ema_rate, r_max=r_max))


def _one_value(state: chex.Array, idx: Optional[chex.Array] = None) -> chex.Array:
  """The one feature: the state's value of each example (of ``idx``)."""
  return (state if idx is None else state[idx])[..., None]


def _unchanged(state, idx, values, valid):
  """Features that measurements do not change."""
  del idx, values, valid
  return state


def _constant_feature(n: int) -> FeatureMap:
  def ones(state, idx: Optional[chex.Array] = None) -> chex.Array:
    return jnp.ones(((n if idx is None else idx.shape[0]), 1))
  return FeatureMap(num_examples=n, names=("constant",),
                    init=lambda: jnp.zeros((), jnp.int32), compute=ones,
                    update=_unchanged)


def _last_value(n: int, name: str) -> FeatureMap:
  """One value per example, −1 until measured."""
  def update(state, idx, values, valid):
    # Each example keeps its last valid value; skipped values are dropped.
    return state.at[scatter.last_valid(idx, valid, n)].set(values, mode="drop")
  return FeatureMap(num_examples=n, names=(name,),
                    init=lambda: jnp.full((n,), -1.0, jnp.float32),
                    compute=_one_value, update=update)


def naive_sampler(num_examples: int, *, batch_size: int, floor: float = 1e-3,
                  ema_rate: float = 0.1, r_max: Optional[float] = None) -> Sampler:
  """Naive importance sampling: p_i ∝ the last measured gradient norm of i.

  The ablation of RAIS's robust set: the point estimate plugged into p,

      p_i = (1 − ε) v_i / Σ_j v_j + ε / n,

  v_i the norm measured the last time i was drawn (never-drawn examples at
  the mean of the measured ones), with RAIS's floor ε, its gain ratio and
  its schedule by τ. Fast path (:func:`rais_jax.make_runner`) only.
  """
  _check_common(num_examples, batch_size, floor)
  return _fast_path_sampler(SamplerConfig(
      kind="naive", feature_map=_last_value(num_examples, "last norm"),
      batch_size=batch_size, floor=floor, ema_rate=ema_rate, r_max=r_max))


def loss_sampler(num_examples: int, *, batch_size: int,
                 floor: float = 1e-3) -> Sampler:
  """Loss-based importance sampling: p_i ∝ the last seen loss of i.

  The loss variant of Katharopoulos & Fleuret (ICML 2018), without their
  presampling: p_i = (1 − ε) ℓ_i / Σ_j ℓ_j + ε / n with the loss of i when it
  was last drawn (never-drawn examples at the mean), unbiased weights
  1/(n p_i), and the plain learning rate (gain ratio 1: no norms are
  measured). Losses must be ≥ 0 (negative ones are skipped and counted).
  Fast path (:func:`rais_jax.make_runner`) only.
  """
  _check_common(num_examples, batch_size, floor)
  return _fast_path_sampler(SamplerConfig(
      kind="loss", feature_map=_last_value(num_examples, "last loss"),
      batch_size=batch_size, floor=floor))


def selective_backprop(num_examples: int, *, batch_size: int, beta: float = 1.0,
                       history_size: int = 1024) -> Sampler:
  """Selective-Backprop (Jiang et al., 2019): backpropagate the high-loss
  examples among ⌈(β + 1) m⌉ uniform candidates (see :mod:`rais_jax.selection`).

  Args:
    num_examples: n.
    batch_size: m, the examples backpropagated per step.
    beta: β, the selectivity: a candidate is kept with probability F(L)^β
      (β = 1, 2, 3 keep about 1/2, 1/3, 1/4; the paper uses these).
    history_size: R, the recent losses F is taken over (1024 in the paper's code).
  """
  _check_common(num_examples, batch_size, 1.0)
  if beta <= 0:
    raise ValueError(f"beta must be > 0; got {beta}.")
  if history_size < 1:
    raise ValueError(f"history_size must be ≥ 1; got {history_size}.")
  return _fast_path_sampler(SamplerConfig(
      kind="selective", feature_map=_constant_feature(num_examples),
      batch_size=batch_size, floor=1.0, beta=beta, history_size=history_size,
      candidates=selection.num_candidates(beta, batch_size)))


def infobatch(num_examples: int, *, batch_size: int, num_epochs: int,
              prune_ratio: float = 0.5, anneal: float = 0.875) -> Sampler:
  """InfoBatch (Qin et al., ICLR 2024): each epoch, leave out a random
  fraction of the below-mean-loss examples and up-weight the rest of them
  (see :mod:`rais_jax.selection`). Train epoch by epoch with
  :meth:`rais_jax.Runner.run_epoch`.

  Args:
    num_examples: n.
    batch_size: m.
    num_epochs: E, the run's epochs (the annealing starts after ⌊δ E⌋).
    prune_ratio: r, the fraction of the below-mean examples left out.
    anneal: δ: the epochs after the first ⌊δ E⌋ use the full data.
  """
  _check_common(num_examples, batch_size, 1.0)
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples.")
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be ≥ 1; got {num_epochs}.")
  if not 0.0 <= prune_ratio < 1.0:
    raise ValueError(f"prune_ratio must lie in [0, 1); got {prune_ratio}.")
  if not 0.0 <= anneal <= 1.0:
    raise ValueError(f"anneal must lie in [0, 1]; got {anneal}.")
  return _fast_path_sampler(SamplerConfig(
      kind="infobatch", feature_map=_constant_feature(num_examples),
      batch_size=batch_size, floor=1.0, prune_ratio=prune_ratio, anneal=anneal,
      num_epochs=num_epochs))
