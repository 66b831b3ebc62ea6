"""The RAIS sampler: O(m log n) robust importance sampling over a state pytree.

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

(PT) runs every ``pt_period`` = ⌈|D|/m⌉ steps on a snapshot of D and its result
is applied exactly ``pt_delay`` steps later, so runs are reproducible for a
given key whether the solve ran in the background (``pt_mode="async"``: an
``io_callback`` hands the snapshot to a host thread) or in-graph
(``pt_mode="sync"``: ``lax.cond`` at the delivery step, for TPUs and tests).
A solve that fails or returns non-finite values keeps the old (c, d) and is
counted in the diagnostics.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import threading
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import io_callback

from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax import robust
from rais_jax import sum_tree
from rais_jax.features import FeatureMap
from rais_jax.pt_solver import PTInfo, solve_pt

PyTree = Any


@struct.dataclass
class Records:
  """Ring buffer D of the last |D| measurements (s̃_j, ṽ_j, p_j)."""

  features: chex.Array  # (|D|, d_R)
  norms: chex.Array  # (|D|,)
  probs: chex.Array  # (|D|,)
  position: chex.Array  # int32, next slot to write
  size: chex.Array  # int32, number of slots written (≤ |D|)


@struct.dataclass
class PendingSolve:
  """The inputs of the (PT) solve in flight, applied at step ``due``."""

  features: chex.Array
  norms: chex.Array
  probs: chex.Array
  feature_sum: chex.Array  # S at submission
  init_c: chex.Array  # warm start
  init_d: chex.Array
  due: chex.Array  # int32 step of delivery, -1 when none is in flight


@struct.dataclass
class Diagnostics:
  pt_solves: chex.Array  # int32: solves applied
  pt_failures: chex.Array  # int32: solves rejected (error or non-finite)
  pt_iterations: chex.Array  # int32: of the last solve
  pt_converged: chex.Array  # bool: of the last solve
  pt_objective: chex.Array  # ⟨d, S⟩ of the last solve
  nonfinite_norms: chex.Array  # int32: measurements skipped

  @classmethod
  def zeros(cls) -> "Diagnostics":
    i0 = lambda: jnp.zeros((), jnp.int32)  # separate buffers: donatable
    return cls(i0(), i0(), i0(), jnp.zeros((), bool), jnp.zeros((), jnp.float32), i0())


@struct.dataclass
class SamplerState:
  features: PyTree
  trees: sum_tree.SumTree  # stack of 3: a, b, ones
  # The trees' roots, kept beside them: reading them from ``trees`` would add
  # reads of the O(n) buffer that XLA re-derives inside every consumer, out of
  # order with the trees' in-place update, and it would then copy the trees
  # every step (measured: ~50 ms at n = 10⁷ on CPU).
  totals: chex.Array  # (3,)
  c: chex.Array  # (d_R,)
  d: chex.Array  # (d_R,)
  fitted: chex.Array  # bool: (c, d) define the distribution (else uniform)
  records: Records
  pending: PendingSolve
  moments: gain_ratio_lib.GainRatioState
  step: chex.Array  # int32 number of updates
  diagnostics: Diagnostics


class Sample(NamedTuple):
  indices: chex.Array  # (m,) int32
  probs: chex.Array  # (m,) p_k
  weights: chex.Array  # (m,) 1 / (n p_k)


class Sampler(NamedTuple):
  """Pure functions over a :class:`SamplerState` (like an optax transform).

  * ``init()`` → state.
  * ``sample(state, key)`` → :class:`Sample` of m indices.
  * ``update(state, sample, norms, *, grad_sq_norm, grad_halves_inner=None)``
    → state after measuring the sampled examples' gradient norms.
  * ``gain_ratio(state)`` → r ∈ [1, r_max].
  * ``probabilities(state)`` → p over all n examples (O(n); for analysis).
  * ``set_parameters(state, c, d)`` → state sampling from the robust
    distribution of (c, d) (trees rebuilt, O(n)); e.g. to warm-start a run.
  * ``refresh(state, norms)`` → state; oracle samplers only: p ∝ norms.
  """

  init: Callable[[], SamplerState]
  sample: Callable[[SamplerState, chex.PRNGKey], Sample]
  update: Callable[..., SamplerState]
  gain_ratio: Callable[[SamplerState], chex.Array]
  probabilities: Callable[[SamplerState], chex.Array]
  set_parameters: Callable[[SamplerState, chex.Array, chex.Array], SamplerState]
  refresh: Optional[Callable[[SamplerState, chex.Array], SamplerState]]
  num_examples: int
  batch_size: int
  feature_names: tuple[str, ...]
  pt_mode: str  # "async" or "sync" (also for samplers that never solve)


class _AsyncPT:
  """Runs (PT) solves on a background thread and the host CPU, keyed by content.

  The key includes a digest of the snapshot, so two runs that share a sampler
  never read each other's results, and a fetch with no matching submission
  (e.g. after restoring a checkpoint in a new process) solves on the spot.
  """

  _MAX_IN_FLIGHT = 16

  def __init__(self, solve: Callable[..., tuple]):
    self._solve = solve
    # Solve on the host: on an accelerator the solve would queue behind the
    # running train step, which may be the one waiting for its result.
    try:
      self._device = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
      self._device = None
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="rais-pt")
    self._futures: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _key(args) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in args:
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

  def _safe_solve(self, *args):
    try:
      if self._device is not None:
        args = jax.device_put(args, self._device)
      out = self._solve(*args)
      return jax.tree.map(np.asarray, out)
    except Exception:  # pylint: disable=broad-except
      return None  # reported as a failed solve by ``fetch``

  def warm_up(self, *args) -> None:
    """Compiles the solver in the background (first deliveries don't wait)."""
    self._executor.submit(self._safe_solve, *(np.asarray(a) for a in args))

  def submit(self, *args) -> np.ndarray:
    args = tuple(np.asarray(a) for a in args)
    key = self._key(args)
    with self._lock:
      if key not in self._futures:
        self._futures[key] = self._executor.submit(self._safe_solve, *args)
      while len(self._futures) > self._MAX_IN_FLIGHT:
        self._futures.popitem(last=False)
    return np.zeros((), np.int32)

  def fetch(self, *args):
    args = tuple(np.asarray(a) for a in args)
    key = self._key(args)
    with self._lock:
      future = self._futures.pop(key, None)
    out = future.result() if future is not None else self._safe_solve(*args)
    if out is None:
      d_r = args[0].shape[1]
      nan = np.full((d_r,), np.nan, np.float32)
      out = (nan, nan, PTInfo(iterations=np.int32(0), converged=np.bool_(False),
                              objective=np.float32(np.nan),
                              constraint=np.float32(np.nan),
                              step_norm=np.float32(np.nan), ok=np.bool_(False)))
    return out


def _ordered_after(x: chex.Array, dependency: chex.Array) -> chex.Array:
  """x, made data-dependent on ``dependency`` (which must be finite).

  XLA does not fold ``0.0 * y`` for floats (y could be inf or NaN), so the
  dependency survives optimisation.
  """
  return x + 0.0 * jnp.sum(dependency).astype(x.dtype)


def _records_init(buffer_size: int, num_features: int) -> Records:
  return Records(features=jnp.zeros((buffer_size, num_features), jnp.float32),
                 norms=jnp.zeros((buffer_size,), jnp.float32),
                 probs=jnp.ones((buffer_size,), jnp.float32),
                 position=jnp.zeros((), jnp.int32),
                 size=jnp.zeros((), jnp.int32))


def _records_push(records: Records, features, norms, probs, valid) -> Records:
  """Appends the valid rows, overwriting the oldest once full."""
  cap = records.norms.shape[0]
  rank = jnp.cumsum(valid) - 1
  slot = jnp.where(valid, (records.position + rank) % cap, cap)  # cap: dropped
  put = lambda buf, x: buf.at[slot].set(x.astype(buf.dtype), mode="drop")
  count = valid.sum(dtype=jnp.int32)
  return Records(features=put(records.features, features),
                 norms=put(records.norms, norms),
                 probs=put(records.probs, probs),
                 position=(records.position + count) % cap,
                 size=jnp.minimum(records.size + count, cap))


def _make_sampler(feature_map: FeatureMap, *, batch_size: int, floor: float,
                  buffer_size: int, pt_period: int, pt_delay: int,
                  pt_mode: str, pt_max_iters: int, ema_rate: float,
                  r_max: Optional[float], scale_free: bool,
                  use_gain_ratio: bool, measure: bool = True,
                  initial_cd: Optional[tuple[np.ndarray, np.ndarray]] = None,
                  fitted_at_init: bool = False) -> Sampler:
  n = feature_map.num_examples
  m = batch_size
  d_r = feature_map.num_features
  pt_enabled = pt_period > 0
  solve = lambda f, v, p, s, c, d: solve_pt(f, v, p, s, init=(c, d),
                                             max_iters=pt_max_iters)
  async_pt = _AsyncPT(jax.jit(solve)) if pt_enabled and pt_mode == "async" else None
  vector, scalar = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((d_r,), ()))
  result_shapes = (vector, vector, PTInfo(
      iterations=jax.ShapeDtypeStruct((), jnp.int32),
      converged=jax.ShapeDtypeStruct((), bool), objective=scalar,
      constraint=scalar, step_norm=scalar, ok=jax.ShapeDtypeStruct((), bool)))

  def leaf_rows(a: chex.Array, b: chex.Array) -> chex.Array:
    """Leaf values of the stacked trees: a, b and ones (the uniform floor)."""
    return jnp.stack([a, b, jnp.ones_like(a)])

  def trees_for(features_state, c, d) -> dict[str, chex.Array]:
    """``trees`` and ``totals`` fields rebuilt from all features, O(n)."""
    if not measure:  # U-SGD never reads the trees: keep them O(1)
      trees = sum_tree.build(jnp.ones((3, 1), jnp.float32))
    else:
      a, b = robust.centres_and_widths(c, d, feature_map.compute(features_state, None))
      trees = sum_tree.build(leaf_rows(a, b))
    return {"trees": trees, "totals": sum_tree.total(trees)}

  def init() -> SamplerState:
    fstate = feature_map.init()
    c, d = jnp.zeros((d_r,), jnp.float32), jnp.zeros((d_r,), jnp.float32)
    if initial_cd is not None:
      c, d = (jnp.asarray(x, jnp.float32) for x in initial_cd)
    records = _records_init(buffer_size, d_r)
    # Distinct buffers everywhere (no aliasing), so the state can be donated.
    snapshot = _records_init(buffer_size, d_r)
    pending = PendingSolve(
        features=snapshot.features, norms=snapshot.norms, probs=snapshot.probs,
        feature_sum=jnp.zeros((d_r,), jnp.float32), init_c=c.copy(), init_d=d.copy(),
        due=jnp.full((), -1, jnp.int32))
    if async_pt is not None:
      async_pt.warm_up(*jax.tree.map(np.asarray, (
          pending.features, pending.norms, pending.probs, pending.feature_sum,
          pending.init_c, pending.init_d)))
    return SamplerState(
        features=fstate, **trees_for(fstate, c, d), c=c, d=d,
        fitted=jnp.asarray(fitted_at_init), records=records, pending=pending,
        moments=gain_ratio_lib.init(), step=jnp.zeros((), jnp.int32),
        diagnostics=Diagnostics.zeros())

  def mixture(state: SamplerState):
    """(A, k, A + kB, whether the robust distribution is usable)."""
    a_total, b_total, _ = state.totals
    k = robust.mixture_scale(b_total)
    mass = a_total + k * b_total
    usable = state.fitted & (mass > 0) & jnp.isfinite(mass)
    return a_total, k, mass, usable

  def probs_at(state: SamplerState, idx: chex.Array) -> chex.Array:
    _, k, mass, usable = mixture(state)
    a, b, _ = sum_tree.leaves(state.trees, idx)
    robust_p = (1.0 - floor) * (a + k * b) / jnp.where(usable, mass, 1.0) + floor / n
    return jnp.where(usable, robust_p, 1.0 / n)

  def sample(state: SamplerState, key: chex.PRNGKey) -> Sample:
    if not measure:  # U-SGD: plain uniform draws, no tree descent
      idx = jax.random.randint(key, (m,), 0, n, jnp.int32)
      return Sample(indices=idx, probs=jnp.full((m,), 1.0 / n),
                    weights=jnp.ones((m,)))
    a_total, _, mass, usable = mixture(state)
    u = jax.random.uniform(key, (state.trees.depth + 1, m))
    # Mixture component per draw from u[0]: tree a, tree b, or uniform (ones).
    share_a = (1.0 - floor) * a_total / jnp.where(usable, mass, 1.0)
    which = jnp.where(u[0] < share_a, 0, jnp.where(u[0] < 1.0 - floor, 1, 2))
    which = jnp.where(usable, which, 2)
    idx = sum_tree.descend(state.trees, u[1:], which)
    p = probs_at(state, idx)
    return Sample(indices=idx, probs=p, weights=1.0 / (n * p))

  def probabilities(state: SamplerState) -> chex.Array:
    return probs_at(state, jnp.arange(n))

  def deliver(state: SamplerState) -> SamplerState:
    pend = state.pending
    args = (pend.features, pend.norms, pend.probs, pend.feature_sum,
            pend.init_c, pend.init_d)
    if async_pt is not None:
      c, d, info = io_callback(async_pt.fetch, result_shapes, *args)
    else:
      c, d, info = solve(*args)
    ok = info.ok & jnp.all(c >= 0) & jnp.all(d >= 0)
    state = jax.lax.cond(ok, lambda s: set_parameters(s, c, d), lambda s: s,
                         state)
    diag = state.diagnostics
    diag = diag.replace(
        pt_solves=diag.pt_solves + ok.astype(jnp.int32),
        pt_failures=diag.pt_failures + (~ok).astype(jnp.int32),
        pt_iterations=info.iterations.astype(jnp.int32),
        pt_converged=info.converged.astype(bool),
        pt_objective=info.objective.astype(jnp.float32))
    return state.replace(diagnostics=diag, pending=pend.replace(due=jnp.full((), -1, jnp.int32)))

  def set_parameters(state: SamplerState, c: chex.Array,
                     d: chex.Array) -> SamplerState:
    c, d = jnp.asarray(c, jnp.float32), jnp.asarray(d, jnp.float32)
    chex.assert_shape([c, d], (d_r,))
    return state.replace(c=c, d=d, **trees_for(state.features, c, d),
                         fitted=jnp.ones((), bool))

  def submit(state: SamplerState) -> SamplerState:
    rec = state.records
    feature_sum = feature_map.compute(state.features, None).sum(0)
    pending = PendingSolve(features=rec.features, norms=rec.norms,
                           probs=rec.probs, feature_sum=feature_sum,
                           init_c=state.c, init_d=state.d,
                           due=state.step + pt_delay)
    if async_pt is not None:
      token = io_callback(
          async_pt.submit, jax.ShapeDtypeStruct((), jnp.int32),
          pending.features, pending.norms, pending.probs, pending.feature_sum,
          pending.init_c, pending.init_d)
      # Tie the callback into the state so it is never dead-code eliminated.
      pending = pending.replace(due=pending.due + token)
    return state.replace(pending=pending)

  def update(state: SamplerState, sample_: Sample, norms: chex.Array, *,
             grad_sq_norm: chex.Array,
             grad_halves_inner: Optional[chex.Array] = None) -> SamplerState:
    chex.assert_shape(norms, (m,))
    if not measure:
      return state.replace(step=state.step + 1)
    idx, p = sample_.indices, sample_.probs
    features_before = feature_map.compute(state.features, idx)
    norms = norms.astype(jnp.float32)
    valid = jnp.isfinite(norms) & (norms >= 0)
    clean = jnp.where(valid, norms, 0.0)
    records = _records_push(state.records, features_before, clean, p, valid)
    # The features were read (features_before) and the trees were read (to
    # sample and to compute p) before being updated in place below. Making the
    # written values depend on those reads orders them first; otherwise XLA
    # copies the O(n) buffers every step (measured: ~50 ms at n = 10⁷ on CPU).
    fstate = feature_map.update(state.features, idx,
                                _ordered_after(clean, features_before), valid)
    a, b = robust.centres_and_widths(state.c, state.d, feature_map.compute(fstate, idx))
    a = _ordered_after(a, p)
    trees = sum_tree.update(state.trees, idx, leaf_rows(a, b))
    moments = state.moments
    if use_gain_ratio:
      moments = gain_ratio_lib.update(
          moments, norms, p, n, grad_sq_norm,
          grad_halves_inner=grad_halves_inner, alpha=ema_rate)
    diag = state.diagnostics
    state = state.replace(
        features=fstate, records=records, moments=moments, step=state.step + 1,
        trees=trees, totals=sum_tree.total(trees),
        diagnostics=diag.replace(
            nonfinite_norms=diag.nonfinite_norms + (~valid).sum(dtype=jnp.int32)))
    if pt_enabled:
      state = jax.lax.cond(state.pending.due == state.step, deliver,
                           lambda s: s, state)
      # Skipped measurements (non-finite norms) can leave D short of full at
      # a period boundary; then wait for the next one rather than solve on
      # empty slots.
      full = state.records.size == buffer_size
      state = jax.lax.cond((state.step % pt_period == 0) & full, submit,
                           lambda s: s, state)
    return state

  def gain_ratio(state: SamplerState) -> chex.Array:
    if not use_gain_ratio:
      return jnp.ones((), jnp.float32)
    return gain_ratio_lib.estimate(state.moments, m, alpha=ema_rate,
                                   r_max=r_max, scale_free=scale_free)

  def refresh(state: SamplerState, norms: chex.Array) -> SamplerState:
    chex.assert_shape(norms, (n,))
    valid = jnp.isfinite(norms) & (norms >= 0)
    fstate = jnp.where(valid, norms.astype(jnp.float32), 0.0)
    diag = state.diagnostics
    return state.replace(
        features=fstate, **trees_for(fstate, state.c, state.d),
        diagnostics=diag.replace(
            nonfinite_norms=diag.nonfinite_norms + (~valid).sum(dtype=jnp.int32)))

  return Sampler(init=init, sample=sample, update=update, gain_ratio=gain_ratio,
                 probabilities=probabilities, set_parameters=set_parameters,
                 refresh=refresh if fitted_at_init else None,
                 num_examples=n, batch_size=m,
                 feature_names=tuple(feature_map.names),
                 pt_mode="async" if async_pt is not None else "sync")


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
                 pt_max_iters: int = 1000, ema_rate: float = 0.01,
                 r_max: Optional[float] = None,
                 scale_free: bool = False) -> Sampler:
  """Robust, approximate importance sampling (RAIS).

  Args:
    features: the per-example :class:`~rais_jax.features.FeatureMap`.
    batch_size: m, the number of indices per step.
    buffer_size: |D|, default min(n, 65536).
    floor: ε, the uniform share of the sampling mass.
    pt_period: steps between (PT) solves, default ⌈|D|/m⌉ (one refill of D).
    pt_delay: steps from a solve's submission to its application, in
      [1, pt_period]; default max(1, pt_period // 2).
    pt_mode: ``"async"`` (background thread via ``io_callback``) or ``"sync"``
      (in-graph). Both give identical runs.
    pt_max_iters: iteration cap of each solve.
    ema_rate: α of the gain-ratio moving averages.
    r_max: upper clip of the gain ratio, default m.
    scale_free: estimate the gain ratio from proxy norms (then ``update``
      needs ``grad_halves_inner``).

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
  delay = max(1, period // 2) if pt_delay is None else pt_delay
  if not 1 <= delay <= period:
    raise ValueError(f"pt_delay must lie in [1, pt_period={period}]; got {delay}.")
  if pt_mode not in ("async", "sync"):
    raise ValueError(f"pt_mode must be 'async' or 'sync'; got {pt_mode!r}.")
  return _make_sampler(
      features, batch_size=batch_size, floor=floor, buffer_size=buffer_size,
      pt_period=period, pt_delay=delay, pt_mode=pt_mode,
      pt_max_iters=pt_max_iters, ema_rate=ema_rate, r_max=r_max,
      scale_free=scale_free, use_gain_ratio=True)


def uniform_sampler(num_examples: int, *, batch_size: int) -> Sampler:
  """Plain uniform sampling with replacement and gain ratio 1 (U-SGD).

  It draws with ``jax.random.randint``, keeps no sum-trees (its state holds
  one-leaf placeholders), and its ``update`` only counts steps: the measured
  norms are ignored.
  """
  _check_common(num_examples, batch_size, 1.0)
  return _make_sampler(
      _constant_feature(num_examples), batch_size=batch_size, floor=1.0,
      buffer_size=1, pt_period=0, pt_delay=0, pt_mode="sync", pt_max_iters=0,
      ema_rate=0.01, r_max=None, scale_free=False, use_gain_ratio=False,
      measure=False)


def oracle_sampler(num_examples: int, *, batch_size: int, floor: float = 1e-3,
                   ema_rate: float = 0.01, r_max: Optional[float] = None,
                   scale_free: bool = False) -> Sampler:
  """O-SGD: p_i ∝ v_i (with the floor) from exact norms of all n examples.

  Sampling is uniform until the first ``refresh(state, norms)`` with the
  (n,) exact norms; call it again on whatever period you choose. Norms
  that go stale between refreshes make the importance weights of examples whose
  gradients grew very large (up to n/ε), so refresh often.
  ``scale_free`` as for :func:`rais_sampler` (set it with proxy step norms).
  """
  _check_common(num_examples, batch_size, floor)
  oracle = FeatureMap(
      num_examples=num_examples, names=("oracle norm",),
      init=lambda: jnp.zeros((num_examples,), jnp.float32),
      compute=lambda s, idx=None: (s if idx is None else s[idx])[..., None],
      update=lambda s, idx, norms, valid: s)
  return _make_sampler(
      oracle, batch_size=batch_size, floor=floor, buffer_size=1, pt_period=0,
      pt_delay=0, pt_mode="sync", pt_max_iters=0, ema_rate=ema_rate,
      r_max=r_max, scale_free=scale_free, use_gain_ratio=True,
      initial_cd=(np.ones((1,), np.float32), np.zeros((1,), np.float32)),
      fitted_at_init=True)


def _constant_feature(n: int) -> FeatureMap:
  return FeatureMap(
      num_examples=n, names=("constant",), init=lambda: jnp.zeros((), jnp.int32),
      compute=lambda s, idx=None: jnp.ones(((n if idx is None else idx.shape[0]), 1)),
      update=lambda s, idx, norms, valid: s)
