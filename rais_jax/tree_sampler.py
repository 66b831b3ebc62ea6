"""Importance sampling from sum-trees: K·m draws per descent, K·m measurements folded in at once.

The engine behind RAIS, the O-SGD oracle and the point-estimate baselines
(:mod:`rais_jax.baselines.naive`, :mod:`rais_jax.baselines.loss_is`). Each
example i has leaf values (a_i, b_i); three sum-trees hold a, b and ones, and

    p_i = (1 − ε) (a_i + k b_i) / (A + k B) + ε / n,   A = Σ a, B = Σ b,

sampled as a mixture: tree a with weight (1 − ε) A/(A + kB), tree b with weight
(1 − ε) kB/(A + kB), the tree of ones (uniform) with weight ε; one descent serves
all three. What a method's leaves and k are is its :class:`TreeSpec`:

* RAIS: a_i = ⟨c, s_i⟩, b_i = ⟨d, s_i⟩ of its features s_i and
  k = B^(-1/2) (the minimax distribution, :mod:`rais_jax.robust`);
* point estimates ("naive", "loss"): a_i = the last measured value (0 if never
  measured), b_i = 1 for never-measured examples, and k = A / (n − B), the mean
  of the measured values, so a never-measured example is sampled as if its
  value were that mean.

The drivers draw the indices of a whole block of K steps before it runs and
fold the block's K·m measurements into the features, the ring buffer D and
the trees after it: one descent for K·m draws has as many sequential levels
as one for m, and one scatter of K·m leaves costs about what one of m does,
so the sampler's cost per step falls by about K. Every draw of the block uses
the distribution at the block's start and each weight 1/(n p_k) the p its
index was drawn from, so the importance-weighted gradient stays unbiased; the
features are only up to K steps staler than with per-step updates. Until the
distribution is first fitted (RAIS's first (PT) solution), sampling is uniform.

The functions are pure, module-level and take a :class:`TreeSpec` first (the
factories bind it with ``functools.partial``).

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from rais_jax import records as records_lib
from rais_jax import robust
from rais_jax import struct
from rais_jax import sum_tree
from rais_jax.features import FeatureMap
from rais_jax.pt import snapshot as pt_snapshot
from rais_jax.sampler import Sample

PyTree = Any
# (c, d, feature values (..., d_R)) -> (a, b), the leaf values.
Leaves = Callable[[chex.Array, chex.Array, chex.Array], tuple[chex.Array, chex.Array]]
# (A, B, n) -> k, the scale of the b-tree in the mixture.
Scale = Callable[[chex.Array, chex.Array, int], chex.Array]


@dataclasses.dataclass(frozen=True)
class TreeSpec:
  """A tree sampler's static configuration (hashable)."""

  feature_map: FeatureMap
  batch_size: int
  leaves: Leaves
  scale: Scale
  floor: float = 1e-3
  buffer_size: int = 1  # |D|
  keeps_records: bool = False  # measurements enter D (RAIS's (PT) learns from it)
  fitted: bool = True  # sample from the leaves at once (RAIS: after the first solve)
  initial_c: float = 0.0

  @property
  def num_examples(self) -> int:
    return self.feature_map.num_examples


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
  """A tree sampler's state."""

  features: PyTree
  trees: sum_tree.SumTree  # stack of 3: a, b, ones
  # The roots, kept beside the trees: reading them from ``trees`` would add
  # reads of the O(n) buffer out of order with its in-place update, and XLA
  # would then copy the O(n) trees on every block.
  totals: chex.Array  # (3,)
  c: chex.Array  # (d_R,)
  d: chex.Array  # (d_R,)
  fitted: chex.Array  # bool: (c, d) define the distribution (else uniform)
  records: records_lib.Records
  pending: pt_snapshot.PendingSolve
  diagnostics: Diagnostics


def robust_leaves(c: chex.Array, d: chex.Array, values: chex.Array
                  ) -> tuple[chex.Array, chex.Array]:
  """RAIS: a = ⟨c, s⟩, b = ⟨d, s⟩."""
  return robust.centres_and_widths(c, d, values)


def robust_scale(a_total: chex.Array, b_total: chex.Array, n: int) -> chex.Array:
  """RAIS: k = B^(-1/2), the minimax mixture."""
  del a_total, n
  return robust.mixture_scale(b_total)


def point_leaves(c: chex.Array, d: chex.Array, values: chex.Array
                 ) -> tuple[chex.Array, chex.Array]:
  """Point estimates: a = the last measured value (0 if never seen), b = 1 for
  never-seen examples (−1 in ``values``), so that with :func:`point_scale`
  a_i + k b_i is the estimate of every example."""
  del c, d
  values = values[..., 0]
  seen = values >= 0
  return jnp.where(seen, values, 0.0), (~seen).astype(jnp.float32)


def point_scale(a_total: chex.Array, b_total: chex.Array, n: int) -> chex.Array:
  """Point estimates: k = A / (n − B), the mean of the seen values."""
  return a_total / jnp.maximum(n - b_total, 1.0)


def _ordered_after(x: chex.Array, dependency: chex.Array) -> chex.Array:
  """x, made data-dependent on ``dependency`` (which must be finite).

  XLA does not fold ``0.0 * y`` for floats (y could be inf or NaN), so the
  dependency survives optimisation and orders an in-place update after a read.
  """
  return x + 0.0 * jnp.sum(dependency).astype(x.dtype)


def leaf_rows(a: chex.Array, b: chex.Array) -> chex.Array:
  """Leaf values of the stacked trees: a, b and ones (the uniform floor)."""
  return jnp.stack([a, b, jnp.ones_like(a)])


def rebuild_trees(spec: TreeSpec, features: PyTree, c: chex.Array,
                  d: chex.Array) -> dict[str, chex.Array]:
  """``trees`` and ``totals`` rebuilt from all features, O(n)."""
  trees = sum_tree.build(leaf_rows(*_leaf_values(spec, c, d, features)))
  return {"trees": trees, "totals": sum_tree.total(trees)}


def _leaf_values(spec: TreeSpec, c: chex.Array, d: chex.Array, features: PyTree,
                 idx: Optional[chex.Array] = None) -> tuple[chex.Array, chex.Array]:
  """(a, b) of the examples at ``idx`` (all if None)."""
  return spec.leaves(c, d, spec.feature_map.compute(features, idx))


def init(spec: TreeSpec) -> RobustState:
  """A fresh state: uniform until fitted (RAIS: its first (PT) solution)."""
  d_r = spec.feature_map.num_features
  features = spec.feature_map.init()
  c = jnp.full((d_r,), spec.initial_c, jnp.float32)
  d = jnp.zeros((d_r,), jnp.float32)
  return RobustState(
      features=features, **rebuild_trees(spec, features, c, d), c=c, d=d,
      fitted=jnp.asarray(spec.fitted),
      records=records_lib.init(spec.buffer_size, d_r),
      pending=pt_snapshot.empty(spec.buffer_size, d_r, c, d),
      diagnostics=Diagnostics.zeros())


def _mixture(spec: TreeSpec, state: RobustState
             ) -> tuple[chex.Array, chex.Array, chex.Array, chex.Array]:
  """(A, k, A + kB, whether the distribution is usable, else uniform)."""
  a_total, b_total, _ = state.totals
  k = spec.scale(a_total, b_total, spec.num_examples)
  mass = a_total + k * b_total
  usable = state.fitted & (mass > 0) & jnp.isfinite(mass)
  return a_total, k, mass, usable


def probabilities_at(spec: TreeSpec, state: RobustState, indices: chex.Array
                     ) -> chex.Array:
  """p of the examples at ``indices`` (any shape)."""
  n = spec.num_examples
  _, k, mass, usable = _mixture(spec, state)
  a, b, _ = sum_tree.leaves(state.trees, indices)
  robust_p = ((1.0 - spec.floor) * (a + k * b) / jnp.where(usable, mass, 1.0)
              + spec.floor / n)
  return jnp.where(usable, robust_p, 1.0 / n)


def probabilities(spec: TreeSpec, state: RobustState) -> chex.Array:
  """p over all n examples (O(n); for analysis and tests)."""
  return probabilities_at(spec, state, jnp.arange(spec.num_examples))


def draw(spec: TreeSpec, state: RobustState, key: chex.PRNGKey,
         shape: tuple[int, ...]) -> Sample:
  """i.i.d. indices of the given shape (e.g. (K, m)) from one tree descent."""
  n = spec.num_examples
  a_total, _, mass, usable = _mixture(spec, state)
  u = jax.random.uniform(key, (state.trees.depth + 1,) + tuple(shape))
  # Mixture component per draw from u[0]: tree a, tree b, or uniform (ones).
  share_a = (1.0 - spec.floor) * a_total / jnp.where(usable, mass, 1.0)
  which = jnp.where(u[0] < share_a, 0, jnp.where(u[0] < 1.0 - spec.floor, 1, 2))
  which = jnp.where(usable, which, 2)
  flat = lambda x: x.reshape(x.shape[:1] + (-1,))
  idx = sum_tree.descend(state.trees, flat(u[1:]), which.reshape(-1)).reshape(shape)
  p = probabilities_at(spec, state, idx)
  return Sample(indices=idx, probs=p, weights=1.0 / (n * p))


def count_nonfinite(state: RobustState, valid: chex.Array) -> RobustState:
  diag = state.diagnostics
  return state.replace(diagnostics=diag.replace(
      nonfinite_norms=diag.nonfinite_norms + (~valid).sum(dtype=jnp.int32)))


def _valid(values: chex.Array) -> tuple[chex.Array, chex.Array]:
  values = values.reshape(-1).astype(jnp.float32)
  return values, jnp.isfinite(values) & (values >= 0)


def fold_in(spec: TreeSpec, state: RobustState, sample: Sample,
            values: chex.Array) -> RobustState:
  """Folds the measured values of the drawn examples into the state.

  ``sample`` and ``values`` have any common shape (e.g. (K, m) for a block):
  the features, D (with the features before this fold-in, if the spec keeps
  records) and the leaves of the drawn examples. Non-finite or negative
  values are skipped and counted.
  """
  idx, p = sample.indices.reshape(-1), sample.probs.reshape(-1)
  values, valid = _valid(values)
  fmap = spec.feature_map
  clean = jnp.where(valid, values, 0.0)
  changes = {}
  if spec.keeps_records:  # D records the features before this fold-in
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
  a, b = _leaf_values(spec, state.c, state.d, features, idx)
  trees = sum_tree.update_many(state.trees, idx, leaf_rows(_ordered_after(a, p), b))
  state = state.replace(features=features, trees=trees,
                        totals=sum_tree.total(trees), **changes)
  return count_nonfinite(state, valid)


def count_only(spec: TreeSpec, state: RobustState, sample: Sample,
               values: chex.Array) -> RobustState:
  """A fold-in that changes nothing but the count of non-finite values (the
  oracle's features change only by :func:`refresh`)."""
  del spec, sample
  return count_nonfinite(state, _valid(values)[1])


def set_parameters(spec: TreeSpec, state: RobustState, c: chex.Array,
                   d: chex.Array) -> RobustState:
  """Samples from the robust distribution of (c, d) from now on (O(n) rebuild)."""
  c, d = jnp.asarray(c, jnp.float32), jnp.asarray(d, jnp.float32)
  chex.assert_shape([c, d], (spec.feature_map.num_features,))
  return state.replace(c=c, d=d, **rebuild_trees(spec, state.features, c, d),
                       fitted=jnp.ones((), bool))


def refresh(spec: TreeSpec, state: RobustState, norms: chex.Array) -> RobustState:
  """Oracle samplers: p ∝ ``norms`` (n,) of all examples from now on."""
  chex.assert_shape(norms, (spec.num_examples,))
  norms, valid = _valid(norms)
  features = jnp.where(valid, norms, 0.0)
  state = state.replace(features=features,
                        **rebuild_trees(spec, features, state.c, state.d))
  return count_nonfinite(state, valid)
