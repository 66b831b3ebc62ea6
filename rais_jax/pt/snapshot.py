"""The (PT) snapshot in the sampler state: taken at a period boundary, delivered later.

At a period boundary the ring buffer D (features s̃_j, norms ṽ_j,
probabilities p_j), the feature sum S = Σ_i s_i and the warm start (c, d) are
copied into :class:`PendingSolve` with the step it is ``due`` at; the solve
(:func:`rais_jax.pt.solver.solve_pt`) runs on them wherever the driver
chooses (in-graph, on a host thread), and :func:`deliver` applies its result
at that step: the new (c, d) if the solve succeeded, the old ones otherwise,
counted either way in the sampler's diagnostics.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from rais_jax import records as records_lib
from rais_jax import struct
from rais_jax.features import FeatureMap

PyTree = Any


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


def empty(num_records: int, num_features: int, c: chex.Array,
          d: chex.Array) -> PendingSolve:
  """No solve in flight (``due`` = −1)."""
  snap = records_lib.init(num_records, num_features)
  return PendingSolve(
      features=snap.features, norms=snap.norms, probs=snap.probs,
      feature_sum=jnp.zeros((num_features,), jnp.float32), init_c=c.copy(),
      init_d=d.copy(), due=jnp.full((), -1, jnp.int32))


def take(feature_map: FeatureMap, state: PyTree, due: chex.Array) -> PyTree:
  """Snapshots D, S and the warm start into ``state.pending``, due at ``due``."""
  rec = state.records
  features = feature_map.compute(state.features, None)
  # A matrix-vector product: XLA:CPU's column sum was slower.
  feature_sum = jnp.matmul(jnp.ones(features.shape[:1], features.dtype), features,
                           precision=jax.lax.Precision.HIGHEST)
  return state.replace(pending=PendingSolve(
      features=rec.features, norms=rec.norms, probs=rec.probs,
      feature_sum=feature_sum, init_c=state.c, init_d=state.d,
      due=jnp.asarray(due, jnp.int32)))


def take_if_full(feature_map: FeatureMap, state: PyTree, due: chex.Array) -> PyTree:
  """:func:`take` if D is full, else ``state`` unchanged.

  Skipped (non-finite) measurements can leave D short of full at a period
  boundary: then nothing is submitted until the next one. A select, not a
  ``cond``: the state holds O(n) arrays that a conditional would copy.
  """
  new = take(feature_map, state, due)
  full = records_lib.is_full(state.records)
  pending = jax.tree.map(lambda a, b: jnp.where(full, a, b), new.pending,
                         state.pending)
  return state.replace(pending=pending)


def deliver(set_parameters: Callable[[PyTree, chex.Array, chex.Array], PyTree],
            state: PyTree, solved: tuple) -> PyTree:
  """Applies a solve's (c, d, info) if it succeeded; counts it either way."""
  c, d, info = solved
  ok = info.ok & jnp.all(c >= 0) & jnp.all(d >= 0)
  state = jax.lax.cond(ok, lambda s: set_parameters(s, c, d), lambda s: s, state)
  diag = state.diagnostics
  diag = diag.replace(
      pt_solves=diag.pt_solves + ok.astype(jnp.int32),
      pt_failures=diag.pt_failures + (~ok).astype(jnp.int32),
      pt_iterations=info.iterations.astype(jnp.int32),
      pt_converged=info.converged.astype(bool),
      pt_objective=info.objective.astype(jnp.float32))
  return state.replace(diagnostics=diag, pending=state.pending.replace(
      due=jnp.full((), -1, jnp.int32)))
