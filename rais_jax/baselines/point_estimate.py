"""Point-estimate importance sampling: p_i ∝ the last measured value of example i.

The shared engine of :mod:`rais_jax.baselines.naive` (gradient norms) and
:mod:`rais_jax.baselines.loss_is` (losses):

    p_i = (1 − ε) v_i / Σ_j v_j + ε / n,

v_i the value measured the last time i was drawn, never-drawn examples at the
mean of the measured ones (:func:`rais_jax.tree_sampler.point_leaves`), with
unbiased weights 1/(n p_i). Sampled from sum-trees like RAIS
(:mod:`rais_jax.tree_sampler`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp

from rais_jax import scatter
from rais_jax import tree_sampler as ts
from rais_jax.features import FeatureMap, one_value
from rais_jax.sampler import Sampler, check_common


def last_value(n: int, name: str) -> FeatureMap:
  """One value per example, −1 until measured."""
  def update(state, idx, values, valid):
    # Each example keeps its last valid value; skipped values are dropped.
    return state.at[scatter.last_valid(idx, valid, n)].set(values, mode="drop")
  return FeatureMap(num_examples=n, names=(name,),
                    init=lambda: jnp.full((n,), -1.0, jnp.float32),
                    compute=one_value, update=update)


def point_sampler(name: str, value_name: str, num_examples: int, *,
                  batch_size: int, floor: float, **facts: Any) -> Sampler:
  """A tree sampler over the last measured value (``value_name``) of each
  example; ``facts`` are the :class:`~rais_jax.Sampler` flags (what the step
  measures and folds in, whether r raises the learning rate)."""
  check_common(num_examples, batch_size, floor)
  spec = ts.TreeSpec(feature_map=last_value(num_examples, value_name),
                     batch_size=batch_size, leaves=ts.point_leaves,
                     scale=ts.point_scale, floor=floor)
  bind = lambda fn: functools.partial(fn, spec)
  return Sampler(
      name=name, num_examples=num_examples, batch_size=batch_size,
      feature_names=(value_name,), init=bind(ts.init), draw=bind(ts.draw),
      fold_in=bind(ts.fold_in), probabilities=bind(ts.probabilities), **facts)
