"""Selective-Backprop as a sampling method: forward candidates, backpropagate high losses.

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

Not importance sampling: no unbiased weights. It runs on the same step as
RAIS (the step forwards the candidates this sampler draws and calls its
``select``), so that in :mod:`rais_jax.experiments.compare` only the method
differs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from rais_jax import struct
from rais_jax.sampler import Sampler, check_common


@dataclasses.dataclass(frozen=True)
class Config:
  num_examples: int
  batch_size: int
  beta: float = 1.0  # β, the selectivity
  history_size: int = 1024  # R

  @property
  def candidates(self) -> int:
    """M = ⌈(β + 1) m⌉: m of them are kept in expectation."""
    return math.ceil((self.beta + 1.0) * self.batch_size)


class Candidates(NamedTuple):
  """A block's draw: M candidates per step."""

  indices: chex.Array  # (K, M) int32, uniform
  uniforms: chex.Array  # (K, M) in [0, 1): candidate j is kept if below P_j


@struct.dataclass
class SelectiveBackpropState(struct.PyTreeNode):
  history: chex.Array  # (R,) the last R candidate losses; NaN: empty slot
  forwarded: chex.Array  # int32 candidates forwarded
  backpropagated: chex.Array  # int32 examples backpropagated
  nonfinite_losses: chex.Array  # int32 candidate losses skipped


def init(config: Config) -> SelectiveBackpropState:
  i0 = lambda: jnp.zeros((), jnp.int32)
  return SelectiveBackpropState(
      history=jnp.full((config.history_size,), jnp.nan, jnp.float32),
      forwarded=i0(), backpropagated=i0(), nonfinite_losses=i0())


def keep_probabilities(config: Config, history: chex.Array,
                       losses: chex.Array) -> chex.Array:
  """P_j = F(L_j)^β, F the fraction of the (finite) history at or below L_j;
  1 while the history is empty, 0 for a non-finite loss."""
  valid = jnp.isfinite(history)
  count = valid.sum()
  below = (valid & (history <= losses[:, None])).sum(axis=1)
  cdf = jnp.where(count > 0, below / jnp.maximum(count, 1), 1.0)
  return jnp.where(jnp.isfinite(losses), cdf ** config.beta, 0.0)


def slots(config: Config, history: chex.Array, losses: chex.Array,
          uniforms: chex.Array) -> tuple[chex.Array, chex.Array]:
  """(slots, valid): the positions among the M candidates of the first m
  kept ones (in draw order), and which of the m slots hold a kept one."""
  m = config.batch_size
  keep = uniforms < keep_probabilities(config, history, losses)
  chosen = jnp.argsort(~keep, stable=True)[:m]
  valid = jnp.arange(m) < keep.sum()
  return chosen, valid


def record_step(config: Config, state: SelectiveBackpropState,
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


def select(config: Config, state: SelectiveBackpropState, drawn: Candidates,
           losses: chex.Array) -> tuple[chex.Array, chex.Array, SelectiveBackpropState]:
  """One step's choice from its M candidates' losses: (indices (m,), weights
  (m,), state). The kept examples weigh m / kept each (a step that kept fewer
  than m averages over those); empty slots repeat the first kept example at
  weight 0 (an unkept candidate could have a NaN loss, and 0 · NaN would void
  the step)."""
  chosen, valid = slots(config, state.history, losses, drawn.uniforms)
  kept = valid.sum(dtype=jnp.int32)
  state = record_step(config, state, losses, kept)
  indices = jnp.where(valid, drawn.indices[chosen], drawn.indices[chosen[0]])
  weights = valid * (config.batch_size / jnp.maximum(kept, 1))
  return indices, weights, state


def draw(config: Config, state: SelectiveBackpropState, key: chex.PRNGKey,
         shape: tuple[int, ...]) -> Candidates:
  """Uniform candidates for ``shape`` = (..., m): (..., M) of them."""
  del state
  idx_key, keep_key = jax.random.split(key)
  shape = tuple(shape[:-1]) + (config.candidates,)
  return Candidates(
      indices=jax.random.randint(idx_key, shape, 0, config.num_examples, jnp.int32),
      uniforms=jax.random.uniform(keep_key, shape))


def _fold_in(state, drawn, measured):
  """Nothing after a block: its steps updated the history (:func:`select`)."""
  del drawn, measured
  return state


def selective_backprop(num_examples: int, *, batch_size: int, beta: float = 1.0,
                       history_size: int = 1024) -> Sampler:
  """Selective-Backprop (Jiang et al., 2019): backpropagate the high-loss
  examples among ⌈(β + 1) m⌉ uniform candidates.

  Args:
    num_examples: n.
    batch_size: m, the examples backpropagated per step.
    beta: β, the selectivity: a candidate is kept with probability F(L)^β
      (β = 1, 2, 3 keep about 1/2, 1/3, 1/4; the paper uses these).
    history_size: R, the recent losses F is taken over (1024 in the paper's code).
  """
  check_common(num_examples, batch_size, 1.0)
  if beta <= 0:
    raise ValueError(f"beta must be > 0; got {beta}.")
  if history_size < 1:
    raise ValueError(f"history_size must be ≥ 1; got {history_size}.")
  config = Config(num_examples, batch_size, beta, history_size)
  bind = lambda fn: functools.partial(fn, config)
  return Sampler(
      name="selective-backprop", num_examples=num_examples, batch_size=batch_size,
      feature_names=(), init=bind(init), draw=bind(draw), fold_in=_fold_in,
      select=bind(select), unbiased=False, needs_all_data=True)
