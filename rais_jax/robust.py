"""The minimax-optimal ("robust") sampling distribution over an ellipsoid.

Each example i has features s_i ≥ 0; parameters c, d ≥ 0 give centres
a_i = ⟨c, s_i⟩ and widths b_i = ⟨d, s_i⟩ of the axis-aligned ellipsoid

    U = {v ≥ 0 : Σ_i (v_i − a_i)² / b_i ≤ 1}

of plausible gradient norms. The distribution minimising the worst case over
U of the single-sample second moment Σ_i v_i² / p_i is

    p_i ∝ a_i + k b_i,    k = (Σ_j b_j)^(-1/2),

with worst-case value (Σ_i a_i + (Σ_i b_i)^(1/2))². (Cauchy–Schwarz gives
Σ v²/p ≥ (Σ v)²; the point of U with the largest Σ v is v = a + k b.)

Reference: Johnson & Guestrin, "Training Deep Models Faster with Robust,
Approximate Importance Sampling", NeurIPS 2018.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _validate(c, d, features) -> None:
  """Clear errors for what can be checked on concrete values."""
  c, d, features = (jnp.asarray(x) for x in (c, d, features))
  if features.ndim != 2:
    raise ValueError(
        f"features must have shape (n, d_R); got shape {features.shape}.")
  d_r = features.shape[1]
  if c.shape != (d_r,) or d.shape != (d_r,):
    raise ValueError(
        f"c and d must have shape ({d_r},) to match features {features.shape}; "
        f"got c {c.shape} and d {d.shape}.")
  for name, x in (("c", c), ("d", d), ("features", features)):
    if isinstance(x, jnp.ndarray) and not _is_tracer(x):
      if bool(np.any(np.asarray(x) < 0)):
        raise ValueError(
            f"{name} must be non-negative (the ellipsoid needs a_i, b_i ≥ 0); "
            f"it has negative entries. Clip or shift it first.")


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def centres_and_widths(c: chex.Array, d: chex.Array,
                       features: chex.Array) -> tuple[chex.Array, chex.Array]:
  """a = features · c and b = features · d, shape (n,) each."""
  # One matmul for both, in full float32. A product-and-sum form fuses with
  # whatever computed the features, and XLA:CPU then recomputes them for
  # each of a and b.
  ab = jnp.matmul(features, jnp.stack([c, d], axis=-1),
                  precision=jax.lax.Precision.HIGHEST)
  return ab[..., 0], ab[..., 1]


def mixture_scale(b_total: chex.Array) -> chex.Array:
  """k = (Σ b)^(-1/2), defined as 0 when Σ b = 0 (a point uncertainty set)."""
  safe = jnp.where(b_total > 0, b_total, 1.0)
  return jnp.where(b_total > 0, 1.0 / jnp.sqrt(safe), 0.0)


def robust_probabilities(c: chex.Array, d: chex.Array, features: chex.Array, *,
                         floor: float = 0.0) -> chex.Array:
  """Robust sampling distribution p of shape (n,).

  p_i = (1 − floor) · (a_i + k b_i) / Σ_j (a_j + k b_j) + floor / n, with
  a = features · c, b = features · d and k = (Σ b)^(-1/2).

  Args:
    c: (d_R,) non-negative centre weights.
    d: (d_R,) non-negative width weights.
    features: (n, d_R) non-negative per-example features.
    floor: mass in [0, 1) spread uniformly, keeping every p_i ≥ floor / n > 0
      so that importance weights stay bounded and the estimator unbiased.

  Returns:
    p, shape (n,), summing to 1.
  """
  _validate(c, d, features)
  if not 0.0 <= floor < 1.0:
    raise ValueError(f"floor must lie in [0, 1); got {floor}.")
  a, b = centres_and_widths(c, d, features)
  v = a + mixture_scale(b.sum()) * b
  mass = v.sum()
  if not _is_tracer(mass) and not float(mass) > 0:
    raise ValueError(
        "All a_i + k b_i are zero, so the robust distribution is undefined: "
        "c and d give every example zero weight. Use a feature that is "
        "positive for every example (e.g. the constant feature).")
  n = features.shape[0]
  # Under jit the check above cannot run: a zero or non-finite mass (or
  # non-finite v) gives the uniform distribution rather than NaNs.
  ok = (mass > 0) & jnp.isfinite(mass)
  p = (1.0 - floor) * v / jnp.where(ok, mass, 1.0) + floor / n
  return jnp.where(ok & jnp.all(jnp.isfinite(p)), p, jnp.full_like(p, 1.0 / n))


def worst_case_second_moment(c: chex.Array, d: chex.Array,
                             features: chex.Array) -> chex.Array:
  """max over U of min over p of Σ v²/p, i.e. (Σ a + (Σ b)^(1/2))²."""
  a, b = centres_and_widths(c, d, features)
  return (a.sum() + jnp.sqrt(b.sum())) ** 2
