"""Loss-based importance sampling: p_i ∝ the last seen loss of i.

The loss variant of Katharopoulos & Fleuret ("Not All Samples Are Created
Equal", ICML 2018), without their presampling.
"""

from __future__ import annotations

from rais_jax.baselines.point_estimate import point_sampler
from rais_jax.sampler import Sampler


def loss_sampler(num_examples: int, *, batch_size: int,
                 floor: float = 1e-3) -> Sampler:
  """p_i = (1 − ε) ℓ_i / Σ_j ℓ_j + ε / n with the loss of i when it was last
  drawn (never-drawn examples at the mean), unbiased weights 1/(n p_i), and
  the plain learning rate (gain ratio 1: no norms are measured). Losses must
  be ≥ 0 (negative ones are skipped and counted)."""
  return point_sampler("loss-is", "last loss", num_examples, batch_size=batch_size,
                       floor=floor, folds_losses=True)
