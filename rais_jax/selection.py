"""Data-selection baselines on the fast path: Selective-Backprop and InfoBatch.

Neither is importance sampling with unbiased weights: both choose, from recent
losses, which examples a step backpropagates. They run on the same fast path
as RAIS (:func:`rais_jax.make_runner`: blocks of K steps, the same step, the
same optimizer) so that in :mod:`rais_jax.experiments.compare` only the method differs.
Like :mod:`rais_jax.block_sampler`, the functions are pure, module-level and
take a :class:`~rais_jax.block_sampler.SamplerConfig` first; the factories
:func:`rais_jax.selective_backprop` and :func:`rais_jax.infobatch` build it.

**Selective-Backprop** (Jiang et al., "Accelerating Deep Learning by Focusing
on the Biggest Losers", 2019). Each step forwards M uniform candidates and
keeps candidate j with probability

    P_j = F(L_j)^β,

where F is the empirical CDF of the last R candidate losses (their loss
history, R = 1024) and β the selectivity (β = 1, 2, 3 keep about 1/2, 1/3, 1/4
of the candidates); the kept examples are backpropagated with equal weights,
without importance weights (the gradient is biased towards high losses). Fixed
shapes instead of their stream that fills a queue of m: M = ⌈(β + 1) m⌉
candidates per step (m kept in expectation), the first m kept are
backpropagated, kept candidates beyond m are dropped, and a step that kept
fewer than m averages over those it kept. F is the CDF of the history at each
step (its history takes every step's candidate losses, as theirs does).

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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from rais_jax import scatter, struct

from rais_jax.block_sampler import Sample, SamplerConfig

KINDS = ("selective", "infobatch")


class Candidates(NamedTuple):
  """Selective-Backprop's draw for a block: M candidates per step."""

  indices: chex.Array  # (K, M) int32, uniform
  uniforms: chex.Array  # (K, M) in [0, 1): candidate j is kept if below P_j


@struct.dataclass
class SelectiveBackpropState(struct.PyTreeNode):
  history: chex.Array  # (R,) the last R candidate losses; NaN: empty slot
  forwarded: chex.Array  # int32 candidates forwarded
  backpropagated: chex.Array  # int32 examples backpropagated
  nonfinite_losses: chex.Array  # int32 candidate losses skipped


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


def num_candidates(beta: float, batch_size: int) -> int:
  """M = ⌈(β + 1) m⌉: Selective-Backprop keeps m of them in expectation."""
  return math.ceil((beta + 1.0) * batch_size)


def _i0() -> chex.Array:
  return jnp.zeros((), jnp.int32)


def init(config: SamplerConfig) -> SelectiveBackpropState | InfoBatchState:
  n = config.num_examples
  if config.kind == "selective":
    return SelectiveBackpropState(
        history=jnp.full((config.history_size,), jnp.nan, jnp.float32),
        forwarded=_i0(), backpropagated=_i0(), nonfinite_losses=_i0())
  return InfoBatchState(
      scores=jnp.full((n,), jnp.inf, jnp.float32), weights=jnp.ones((n,), jnp.float32),
      order=jnp.arange(n, dtype=jnp.int32), cursor=_i0(),
      kept=jnp.full((), n, jnp.int32), epoch=_i0(),
      epoch_steps=jnp.full((), max(n // config.batch_size, 1), jnp.int32),
      schedule_advance=jnp.ones((), jnp.float32), pruned=_i0(), nonfinite_losses=_i0())


# -- Selective-Backprop -----------------------------------------------------


def keep_probabilities(config: SamplerConfig, history: chex.Array,
                       losses: chex.Array) -> chex.Array:
  """P_j = F(L_j)^β, F the fraction of the (finite) history at or below L_j;
  1 while the history is empty, 0 for a non-finite loss."""
  valid = jnp.isfinite(history)
  count = valid.sum()
  below = (valid & (history <= losses[:, None])).sum(axis=1)
  cdf = jnp.where(count > 0, below / jnp.maximum(count, 1), 1.0)
  return jnp.where(jnp.isfinite(losses), cdf ** config.beta, 0.0)


def select(config: SamplerConfig, history: chex.Array, losses: chex.Array,
           uniforms: chex.Array) -> tuple[chex.Array, chex.Array]:
  """(slots, valid): the positions among the M candidates of the first m
  kept ones (in draw order), and which of the m slots hold a kept one."""
  m = config.batch_size
  keep = uniforms < keep_probabilities(config, history, losses)
  slots = jnp.argsort(~keep, stable=True)[:m]
  valid = jnp.arange(m) < keep.sum()
  return slots, valid


def record_step(config: SamplerConfig, state: SelectiveBackpropState,
                losses: chex.Array, backpropagated: chex.Array
                ) -> SelectiveBackpropState:
  """A step's M candidate losses enter the history (the last R are kept),
  as the paper's history is updated with every forward pass."""
  losses = losses.astype(jnp.float32)
  finite = jnp.isfinite(losses)
  history = jnp.concatenate([state.history, jnp.where(finite, losses, jnp.nan)])
  return state.replace(
      history=history[-config.history_size:],
      forwarded=state.forwarded + losses.size,
      backpropagated=state.backpropagated + backpropagated,
      nonfinite_losses=state.nonfinite_losses + (~finite).sum(dtype=jnp.int32))


# -- InfoBatch --------------------------------------------------------------


def plan(config: SamplerConfig, state: InfoBatchState, key: chex.PRNGKey
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


def _visit(config: SamplerConfig, state: InfoBatchState, shape: tuple[int, ...]
           ) -> Sample:
  """The next K·m examples of the epoch's order, with their weights (an
  epoch of fewer than m kept examples cycles through them)."""
  size = math.prod(shape)
  position = (state.cursor + jnp.arange(size)) % jnp.maximum(state.kept, 1)
  idx = state.order[position].reshape(shape)
  return Sample(indices=idx, probs=jnp.full(shape, 1.0 / config.num_examples),
                weights=state.weights[idx])


def _record_scores(config: SamplerConfig, state: InfoBatchState, sample: Sample,
                   losses: chex.Array) -> InfoBatchState:
  idx, losses = sample.indices.reshape(-1), losses.reshape(-1).astype(jnp.float32)
  finite = jnp.isfinite(losses)
  # (A block longer than the kept set visits some examples twice.)
  scores = state.scores.at[scatter.last_valid(idx, finite, config.num_examples)].set(
      losses, mode="drop")
  return state.replace(scores=scores, cursor=state.cursor + idx.size,
                       nonfinite_losses=state.nonfinite_losses
                       + (~finite).sum(dtype=jnp.int32))


# -- the interface the runner calls -----------------------------------------


def draw(config: SamplerConfig, state, key: chex.PRNGKey, shape: tuple[int, int]
         ) -> Candidates | Sample:
  """A block's draw, ``shape`` = (K, m): Selective-Backprop's (K, M)
  candidates, or InfoBatch's next K·m examples of the epoch."""
  if config.kind == "selective":
    k = shape[0]
    m_cand = config.candidates
    idx_key, keep_key = jax.random.split(key)
    return Candidates(
        indices=jax.random.randint(idx_key, (k, m_cand), 0, config.num_examples,
                                   jnp.int32),
        uniforms=jax.random.uniform(keep_key, (k, m_cand)))
  return _visit(config, state, shape)


def fold_in(config: SamplerConfig, state, drawn, measured):
  """After a block: InfoBatch records the losses (K, m) of the examples it
  visited; Selective-Backprop has nothing left to do (its steps update its
  history: :func:`record_step`)."""
  if config.kind == "selective":
    return state
  return _record_scores(config, state, drawn, measured)
