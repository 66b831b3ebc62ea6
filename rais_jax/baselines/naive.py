"""Naive importance sampling: p_i ∝ the last measured gradient norm of i.

The ablation of RAIS's robust set: the point estimate plugged into p (see
:mod:`rais_jax.baselines.point_estimate`), with RAIS's floor ε, its gain
ratio and its schedule by τ.
"""

from __future__ import annotations

from typing import Optional

from rais_jax.baselines.point_estimate import point_sampler
from rais_jax.sampler import Sampler


def naive_sampler(num_examples: int, *, batch_size: int, floor: float = 1e-3,
                  ema_rate: float = 0.1, r_max: Optional[float] = None) -> Sampler:
  """Naive importance sampling: p_i = (1 − ε) v_i / Σ_j v_j + ε / n with v_i
  the exact gradient norm measured the last time i was drawn (never-drawn
  examples at the mean of the measured ones); the learning rate raised by the
  gain ratio r (``ema_rate`` α, ``r_max``) as in RAIS."""
  return point_sampler("naive", "last norm", num_examples, batch_size=batch_size,
                       floor=floor, measures_norms=True, boosts_lr=True,
                       ema_rate=ema_rate, r_max=r_max)
