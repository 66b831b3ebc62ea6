"""InfoBatch as a sampling method: prune well-learned examples epoch by epoch.

**InfoBatch** (Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased
Dynamic Data Pruning", ICLR 2024). At the start of each epoch, of the examples
whose last loss is below the mean, a random fraction r (the prune ratio,
default 0.5) is left out and the rest get weight 1/(1 − r), so that the
epoch's gradient keeps its expectation; the kept examples are visited once in
a random order, in ⌊kept / m⌋ steps. The epochs after the first ⌊δ E⌋
(δ = 0.875, their annealing) use the full data, unweighted. Scores start at +∞ (never seen:
always kept, not in the mean), so the first epoch is full. The learning-rate
schedule stays indexed by data epochs: each step of an epoch of s steps
advances it by (n/m)/s steps (the ``schedule_advance`` extra argument of
:func:`rais_jax.scale_by_gain_ratio`), so a pruned epoch ends where a full one
would, as their "adjust an epoch-based schedule" asks.

Train it epoch by epoch (:meth:`rais_jax.Runner.run_epoch`): its
``plan_epoch`` draws each epoch's order before the epoch runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp

from rais_jax import scatter, struct
from rais_jax.sampler import Sample, Sampler, check_common


@dataclasses.dataclass(frozen=True)
class Config:
  num_examples: int
  batch_size: int
  num_epochs: int  # E
  prune_ratio: float = 0.5  # r
  anneal: float = 0.875  # δ


@struct.dataclass
class InfoBatchState(struct.PyTreeNode):
  scores: chex.Array  # (n,) last loss of each example; +inf: never seen
  weights: chex.Array  # (n,) this epoch's weights: 1/(1 − r) or 1
  order: chex.Array  # (n,) int32 this epoch's visiting order, kept ones first
  cursor: chex.Array  # int32 position in ``order``
  kept: chex.Array  # int32 examples kept this epoch (the head of ``order``)
  epoch: chex.Array  # int32 epochs planned
  epoch_steps: chex.Array  # int32 steps of the current epoch
  schedule_advance: chex.Array  # float32 (n/m) / epoch_steps
  pruned: chex.Array  # int32 example visits left out, over all planned epochs
  nonfinite_losses: chex.Array  # int32 losses skipped


def _i0() -> chex.Array:
  return jnp.zeros((), jnp.int32)


def init(config: Config) -> InfoBatchState:
  n = config.num_examples
  return InfoBatchState(
      scores=jnp.full((n,), jnp.inf, jnp.float32), weights=jnp.ones((n,), jnp.float32),
      order=jnp.arange(n, dtype=jnp.int32), cursor=_i0(),
      kept=jnp.full((), n, jnp.int32), epoch=_i0(),
      epoch_steps=jnp.full((), max(n // config.batch_size, 1), jnp.int32),
      schedule_advance=jnp.ones((), jnp.float32), pruned=_i0(), nonfinite_losses=_i0())


def plan(config: Config, state: InfoBatchState, key: chex.PRNGKey
         ) -> InfoBatchState:
  """The next epoch: which examples are visited, in what order, with what weight."""
  n, m = config.num_examples, config.batch_size
  scores = state.scores
  seen = jnp.isfinite(scores)
  mean = jnp.where(seen, scores, 0.0).sum() / jnp.maximum(seen.sum(), 1)
  # Their sampler prunes while the epoch's number (from 1) is ≤ δ E.
  prune_now = state.epoch + 1 <= config.anneal * config.num_epochs
  well_learned = seen & (scores < mean) & prune_now
  keep_ratio = 1.0 - config.prune_ratio
  # Exactly ⌊(1 − r) W⌋ of the W well-learned examples are kept, at random.
  num_keep = jnp.floor(keep_ratio * well_learned.sum()).astype(jnp.int32)
  pick, shuffle = jax.random.split(key)
  by_pick = jnp.argsort(jnp.where(well_learned, jax.random.uniform(pick, (n,)), 2.0))
  rank = jnp.empty((n,), jnp.int32).at[by_pick].set(jnp.arange(n, dtype=jnp.int32))
  kept_well = well_learned & (rank < num_keep)
  kept = ~well_learned | kept_well
  u = jax.random.uniform(shuffle, (n,))
  order = jnp.argsort(jnp.where(kept, u, 1.0 + u)).astype(jnp.int32)
  num_kept = kept.sum(dtype=jnp.int32)
  steps = jnp.maximum(num_kept // m, 1)
  return state.replace(
      weights=jnp.where(kept_well, 1.0 / keep_ratio, 1.0).astype(jnp.float32),
      order=order, cursor=_i0(), kept=num_kept, epoch=state.epoch + 1,
      epoch_steps=steps,
      schedule_advance=((n // m) / steps).astype(jnp.float32),
      pruned=state.pruned + (n - num_kept))


def draw(config: Config, state: InfoBatchState, key: chex.PRNGKey,
         shape: tuple[int, ...]) -> Sample:
  """The next K·m examples of the epoch's order, with their weights (an
  epoch of fewer than m kept examples cycles through them; no randomness:
  :func:`plan` drew the order)."""
  del key
  size = math.prod(shape)
  position = (state.cursor + jnp.arange(size)) % jnp.maximum(state.kept, 1)
  idx = state.order[position].reshape(shape)
  return Sample(indices=idx, probs=jnp.full(shape, 1.0 / config.num_examples),
                weights=state.weights[idx])


def fold_in(config: Config, state: InfoBatchState, sample: Sample,
            losses: chex.Array) -> InfoBatchState:
  """Records the losses of the examples the block visited."""
  idx, losses = sample.indices.reshape(-1), losses.reshape(-1).astype(jnp.float32)
  finite = jnp.isfinite(losses)
  # (A block longer than the kept set visits some examples twice.)
  scores = state.scores.at[scatter.last_valid(idx, finite, config.num_examples)].set(
      losses, mode="drop")
  return state.replace(scores=scores, cursor=state.cursor + idx.size,
                       nonfinite_losses=state.nonfinite_losses
                       + (~finite).sum(dtype=jnp.int32))


def _optimizer_args(state: InfoBatchState) -> dict[str, chex.Array]:
  """The schedule stays indexed by data epochs (see the module)."""
  return {"schedule_advance": state.schedule_advance}


def plan_epoch(config: Config, state: InfoBatchState, key: chex.PRNGKey
               ) -> InfoBatchState:
  """:func:`plan` with the epoch's own key, ``fold_in(key, epoch)``.

  (InfoBatch's blocks draw no random numbers, so sharing the run's key
  stream, fold_in(key, ·), with them correlates nothing.)"""
  return plan(config, state, jax.random.fold_in(key, state.epoch))


def infobatch(num_examples: int, *, batch_size: int, num_epochs: int,
              prune_ratio: float = 0.5, anneal: float = 0.875) -> Sampler:
  """InfoBatch (Qin et al., ICLR 2024): each epoch, leave out a random
  fraction of the below-mean-loss examples and up-weight the rest of them.
  Train epoch by epoch with :meth:`rais_jax.Runner.run_epoch`.

  Args:
    num_examples: n.
    batch_size: m.
    num_epochs: E, the run's epochs (the annealing starts after ⌊δ E⌋).
    prune_ratio: r, the fraction of the below-mean examples left out.
    anneal: δ: the epochs after the first ⌊δ E⌋ use the full data.
  """
  check_common(num_examples, batch_size, 1.0)
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples.")
  if num_epochs < 1:
    raise ValueError(f"num_epochs must be ≥ 1; got {num_epochs}.")
  if not 0.0 <= prune_ratio < 1.0:
    raise ValueError(f"prune_ratio must lie in [0, 1); got {prune_ratio}.")
  if not 0.0 <= anneal <= 1.0:
    raise ValueError(f"anneal must lie in [0, 1]; got {anneal}.")
  config = Config(num_examples, batch_size, num_epochs, prune_ratio, anneal)
  bind = lambda fn: functools.partial(fn, config)
  return Sampler(
      name="infobatch", num_examples=num_examples, batch_size=batch_size,
      feature_names=(), init=bind(init), draw=bind(draw), fold_in=bind(fold_in),
      folds_losses=True, unbiased=False, optimizer_args=_optimizer_args,
      plan_epoch=bind(plan_epoch), epoch_steps=lambda state: state.epoch_steps)
