"""Sampling a block of steps at once: K·m draws per descent, K·m measurements folded in at once.

The fast training path (:mod:`rais_jax.runner`) draws the indices of a whole
block of K steps before the block runs, and folds the block's K·m measured
norms into the features, the ring buffer D and the sum-trees after it: the
per-step loop then holds no sampler work at all. One descent of the trees for
K·m draws has as many sequential levels as one for m, and one scatter of K·m
leaves costs about what one of m does, so the sampler's cost per step falls by
about K.

Every draw of the block uses the distribution at the block's start,

    p_i = (1 − ε) (a_i + k b_i) / (A + k B) + ε / n,   A = Σ a, B = Σ b, k = B^(-1/2),

and each weight 1/(n p_k) uses the p its index was drawn from, so the
importance-weighted gradient stays unbiased; the features are only up to K steps
staler than with per-step updates. Until the first (PT) solution is applied,
sampling is uniform.

The same trees serve the point-estimate baselines ("naive": p ∝ the last
measured gradient norm of each example; "loss": p ∝ its last loss): there
a_i is the last value (0 if never measured), b_i = 1 for never-measured
examples, and k = A / (n − B) is the mean of the measured values, so a
never-measured example is sampled as if its value were that mean.

The functions are pure, module-level and take a :class:`SamplerConfig` first
(the factories in :mod:`rais_jax.sampler` build it; bind it with
``functools.partial``). They work on any state with the fields of
:class:`RobustState` (the per-step :class:`rais_jax.SamplerState` has them too).

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from rais_jax import struct

from rais_jax import records as records_lib
from rais_jax import robust
from rais_jax import sum_tree
from rais_jax.features import FeatureMap

PyTree = Any
# Point-estimate importance sampling (the baselines of :mod:`rais_jax.experiments.compare`):
# p_i ∝ the last measured gradient norm ("naive") or loss ("loss") of example
# i, never-seen examples at the mean of the seen ones.
POINT_KINDS = ("naive", "loss")
KINDS = ("rais", "uniform", "oracle") + POINT_KINDS


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """What a sampler factory was asked for; static (hashable) configuration."""

  kind: str  # one of KINDS, or a selection kind of rais_jax.selection
  feature_map: FeatureMap
  batch_size: int
  floor: float = 1e-3
  buffer_size: int = 1
  pt_period: int = 0  # steps; 0: no (PT)
  pt_delay: int = 0  # steps from submission to application
  pt_mode: str = "sync"
  pt_max_iters: int = 1000
  ema_rate: float = 0.01
  r_max: Optional[float] = None

  @property
  def num_examples(self) -> int:
    return self.feature_map.num_examples

  # Selection methods (rais_jax.selection): Selective-Backprop's β, loss
  # history and candidates per step; InfoBatch's prune ratio, annealing
  # fraction δ and the run's epochs.
  beta: float = 1.0
  history_size: int = 1024
  candidates: int = 0
  prune_ratio: float = 0.5
  anneal: float = 0.875
  num_epochs: int = 0

  @property
  def measures(self) -> bool:
    """Whether the method needs measured gradient norms (its distribution and
    its gain ratio come from them)."""
    return self.kind in ("rais", "oracle", "naive")

  @property
  def has_trees(self) -> bool:
    """Whether p is kept in sum-trees (else uniform or a selection rule)."""
    return self.kind in ("rais", "oracle") + POINT_KINDS


class Sample(NamedTuple):
  indices: chex.Array  # (..., m) int32
  probs: chex.Array  # (..., m) p_k
  weights: chex.Array  # (..., m) 1 / (n p_k)


@struct.dataclass
class PendingSolve(struct.PyTreeNode):
  """The inputs of the (PT) solve in flight, applied at step ``due``."""

  features: chex.Array
  norms: chex.Array
  probs: chex.Array
  feature_sum: chex.Array  # S at submission
  init_c: chex.Array  # warm start
  init_d: chex.Array
  due: chex.Array  # int32 step of delivery, -1 when none is in flight

  def solve_args(self) -> tuple[chex.Array, ...]:
    return (self.features, self.norms, self.probs, self.feature_sum,
            self.init_c, self.init_d)


@struct.dataclass
class Diagnostics(struct.PyTreeNode):
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
class RobustState(struct.PyTreeNode):
  """State of a RAIS or oracle sampler on the fast path (no gain-ratio moments:
  sampling never reads them; the runner keeps them)."""

  features: PyTree
  trees: sum_tree.SumTree  # stack of 3: a, b, ones
  # The roots, kept beside the trees: reading them from ``trees`` would add
  # reads of the O(n) buffer out of order with its in-place update, and XLA
  # would then copy the trees (measured: ~50 ms at n = 10⁷ on CPU).
  totals: chex.Array  # (3,)
  c: chex.Array  # (d_R,)
  d: chex.Array  # (d_R,)
  fitted: chex.Array  # bool: (c, d) define the distribution (else uniform)
  records: records_lib.Records
  pending: PendingSolve
  diagnostics: Diagnostics


@struct.dataclass
class UniformState(struct.PyTreeNode):
  """U-SGD keeps no per-example state."""


def _ordered_after(x: chex.Array, dependency: chex.Array) -> chex.Array:
  """x, made data-dependent on ``dependency`` (which must be finite).

  XLA does not fold ``0.0 * y`` for floats (y could be inf or NaN), so the
  dependency survives optimisation and orders an in-place update after a read.
  """
  return x + 0.0 * jnp.sum(dependency).astype(x.dtype)


def leaf_rows(a: chex.Array, b: chex.Array) -> chex.Array:
  """Leaf values of the stacked trees: a, b and ones (the uniform floor)."""
  return jnp.stack([a, b, jnp.ones_like(a)])


def rebuild_trees(config: SamplerConfig, features: PyTree, c: chex.Array,
                  d: chex.Array) -> dict[str, chex.Array]:
  """``trees`` and ``totals`` rebuilt from all features, O(n)."""
  if not config.has_trees:  # never read: keep them O(1)
    trees = sum_tree.build(jnp.ones((3, 1), jnp.float32))
  else:
    trees = sum_tree.build(leaf_rows(*_leaf_values(config, c, d, features)))
  return {"trees": trees, "totals": sum_tree.total(trees)}


def _leaf_values(config: SamplerConfig, c: chex.Array, d: chex.Array,
                 features: PyTree, idx: Optional[chex.Array] = None
                 ) -> tuple[chex.Array, chex.Array]:
  """(a, b) of the examples at ``idx`` (all if None): ⟨c, s_i⟩ and ⟨d, s_i⟩
  of their features, or for the point kinds :func:`point_leaves` of their
  last values."""
  values = config.feature_map.compute(features, idx)
  if config.kind in POINT_KINDS:
    return point_leaves(values[..., 0])
  return robust.centres_and_widths(c, d, values)


def point_leaves(values: chex.Array) -> tuple[chex.Array, chex.Array]:
  """Point estimates: a = the last measured value (0 if never seen), b = 1 for
  never-seen examples (−1 in ``values``), so that with k = A / (n − B), the
  mean of the seen values, a_i + k b_i is the estimate of every example."""
  seen = values >= 0
  return jnp.where(seen, values, 0.0), (~seen).astype(jnp.float32)


def empty_pending(num_records: int, num_features: int, c: chex.Array,
                  d: chex.Array) -> PendingSolve:
  snapshot = records_lib.init(num_records, num_features)
  return PendingSolve(
      features=snapshot.features, norms=snapshot.norms, probs=snapshot.probs,
      feature_sum=jnp.zeros((num_features,), jnp.float32), init_c=c.copy(),
      init_d=d.copy(), due=jnp.full((), -1, jnp.int32))


def init(config: SamplerConfig) -> RobustState | UniformState:
  """A fresh state. Sampling is uniform until RAIS's (c, d) are first fitted,
  O-SGD's oracle first refreshed, or a naive / loss sampler's first value
  measured."""
  if config.kind == "uniform":
    return UniformState()
  d_r = config.feature_map.num_features
  features = config.feature_map.init()
  c, d = jnp.zeros((d_r,), jnp.float32), jnp.zeros((d_r,), jnp.float32)
  fitted = config.kind != "rais"  # the others sample from their features at once
  if config.kind == "oracle":  # p ∝ the one feature, the oracle norm
    c = jnp.ones((1,), jnp.float32)
  return RobustState(
      features=features, **rebuild_trees(config, features, c, d), c=c, d=d,
      fitted=jnp.asarray(fitted), records=records_lib.init(config.buffer_size, d_r),
      pending=empty_pending(config.buffer_size, d_r, c, d),
      diagnostics=Diagnostics.zeros())


def _mixture(config: SamplerConfig, state
             ) -> tuple[chex.Array, chex.Array, chex.Array, chex.Array]:
  """(A, k, A + kB, whether the distribution is usable, else uniform)."""
  a_total, b_total, _ = state.totals
  if config.kind in POINT_KINDS:  # never-seen examples at the mean seen value
    k = a_total / jnp.maximum(config.num_examples - b_total, 1.0)
  else:
    k = robust.mixture_scale(b_total)
  mass = a_total + k * b_total
  usable = state.fitted & (mass > 0) & jnp.isfinite(mass)
  return a_total, k, mass, usable


def probabilities_at(config: SamplerConfig, state, indices: chex.Array) -> chex.Array:
  """p of the examples at ``indices`` (any shape)."""
  n = config.num_examples
  if config.kind == "uniform":
    return jnp.full(indices.shape, 1.0 / n, jnp.float32)
  _, k, mass, usable = _mixture(config, state)
  a, b, _ = sum_tree.leaves(state.trees, indices)
  robust_p = ((1.0 - config.floor) * (a + k * b) / jnp.where(usable, mass, 1.0)
              + config.floor / n)
  return jnp.where(usable, robust_p, 1.0 / n)


def probabilities(config: SamplerConfig, state) -> chex.Array:
  """p over all n examples (O(n); for analysis and tests)."""
  return probabilities_at(config, state, jnp.arange(config.num_examples))


def draw(config: SamplerConfig, state, key: chex.PRNGKey,
         shape: tuple[int, ...]) -> Sample:
  """i.i.d. indices of the given shape (e.g. (K, m)) from one tree descent."""
  n = config.num_examples
  if config.kind == "uniform":
    idx = jax.random.randint(key, shape, 0, n, jnp.int32)
    return Sample(indices=idx, probs=jnp.full(shape, 1.0 / n),
                  weights=jnp.ones(shape))
  a_total, _, mass, usable = _mixture(config, state)
  u = jax.random.uniform(key, (state.trees.depth + 1,) + tuple(shape))
  # Mixture component per draw from u[0]: tree a, tree b, or uniform (ones).
  share_a = (1.0 - config.floor) * a_total / jnp.where(usable, mass, 1.0)
  which = jnp.where(u[0] < share_a, 0, jnp.where(u[0] < 1.0 - config.floor, 1, 2))
  which = jnp.where(usable, which, 2)
  flat = lambda x: x.reshape(x.shape[:1] + (-1,))
  idx = sum_tree.descend(state.trees, flat(u[1:]), which.reshape(-1)).reshape(shape)
  p = probabilities_at(config, state, idx)
  return Sample(indices=idx, probs=p, weights=1.0 / (n * p))


def count_nonfinite(state, valid: chex.Array):
  diag = state.diagnostics
  return state.replace(diagnostics=diag.replace(
      nonfinite_norms=diag.nonfinite_norms + (~valid).sum(dtype=jnp.int32)))


def fold_in(config: SamplerConfig, state, sample: Sample, norms: chex.Array):
  """Folds measured norms u_k of the drawn examples into the state.

  ``sample`` and ``norms`` have any common shape (e.g. (K, m) for a block).
  RAIS: features, D (with the features before this fold-in) and the leaves of
  the drawn examples; oracle: nothing but the count of non-finite norms
  (its features change only by :func:`refresh`); naive and loss: the last
  value of each drawn example (``norms`` holds the losses for "loss") and its
  leaves; uniform: nothing. Non-finite or negative values are skipped and
  counted.
  """
  if config.kind == "uniform":
    return state
  idx, p = sample.indices.reshape(-1), sample.probs.reshape(-1)
  norms = norms.reshape(-1).astype(jnp.float32)
  valid = jnp.isfinite(norms) & (norms >= 0)
  if config.kind == "oracle":
    return count_nonfinite(state, valid)
  fmap = config.feature_map
  clean = jnp.where(valid, norms, 0.0)
  changes = {}
  if config.kind == "rais":  # D records the features before this fold-in
    features_before = fmap.compute(state.features, idx)
    changes["records"] = records_lib.push(state.records, features_before, clean,
                                          p, valid)
    # The features and the trees were read (features_before; p when
    # sampling) before being updated in place below; making the written
    # values depend on those reads orders them first, otherwise XLA copies
    # the O(n) buffers.
    clean = _ordered_after(clean, features_before)
  features = fmap.update(state.features, idx, clean, valid)
  # Duplicated indices read back the one value the scatter kept, so the
  # tree update below writes equal values for them.
  a, b = _leaf_values(config, state.c, state.d, features, idx)
  trees = sum_tree.update_many(state.trees, idx, leaf_rows(_ordered_after(a, p), b))
  state = state.replace(features=features, trees=trees,
                        totals=sum_tree.total(trees), **changes)
  return count_nonfinite(state, valid)


def set_parameters(config: SamplerConfig, state, c: chex.Array, d: chex.Array):
  """Samples from the robust distribution of (c, d) from now on (O(n) rebuild)."""
  c, d = jnp.asarray(c, jnp.float32), jnp.asarray(d, jnp.float32)
  chex.assert_shape([c, d], (config.feature_map.num_features,))
  return state.replace(c=c, d=d, **rebuild_trees(config, state.features, c, d),
                       fitted=jnp.ones((), bool))


def refresh(config: SamplerConfig, state, norms: chex.Array):
  """Oracle samplers: p ∝ ``norms`` (n,) of all examples from now on."""
  chex.assert_shape(norms, (config.num_examples,))
  valid = jnp.isfinite(norms) & (norms >= 0)
  features = jnp.where(valid, norms.astype(jnp.float32), 0.0)
  state = state.replace(features=features,
                        **rebuild_trees(config, features, state.c, state.d))
  return count_nonfinite(state, valid)


def submit(config: SamplerConfig, state, due: chex.Array):
  """Snapshots D, S and the warm start into ``pending``, to apply at ``due``."""
  rec = state.records
  features = config.feature_map.compute(state.features, None)
  # A matrix-vector product: XLA:CPU's column sum was slower.
  feature_sum = jnp.matmul(jnp.ones(features.shape[:1], features.dtype), features,
                           precision=jax.lax.Precision.HIGHEST)
  return state.replace(pending=PendingSolve(
      features=rec.features, norms=rec.norms, probs=rec.probs,
      feature_sum=feature_sum, init_c=state.c, init_d=state.d,
      due=jnp.asarray(due, jnp.int32)))


def deliver(config: SamplerConfig, state, solved: tuple):
  """Applies a solve's (c, d, info) if it succeeded; counts it either way."""
  c, d, info = solved
  ok = info.ok & jnp.all(c >= 0) & jnp.all(d >= 0)
  state = jax.lax.cond(ok, lambda s: set_parameters(config, s, c, d),
                       lambda s: s, state)
  diag = state.diagnostics
  diag = diag.replace(
      pt_solves=diag.pt_solves + ok.astype(jnp.int32),
      pt_failures=diag.pt_failures + (~ok).astype(jnp.int32),
      pt_iterations=info.iterations.astype(jnp.int32),
      pt_converged=info.converged.astype(bool),
      pt_objective=info.objective.astype(jnp.float32))
  return state.replace(diagnostics=diag, pending=state.pending.replace(
      due=jnp.full((), -1, jnp.int32)))
