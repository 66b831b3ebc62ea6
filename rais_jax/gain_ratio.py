"""The gain ratio r = E‖g_U‖² / E‖g_R‖², estimated online from training steps.

With minibatch size m, uniform single-sample second moment E‖g_U1‖² and
importance-sampled one E‖g_R1‖²,

    r = 1 + (E‖g_U1‖² − E‖g_R1‖²) / (m · E‖g_R‖²).

Per step, from the sampled indices k with probabilities p_k and measured
gradient norms u_k, unbiased estimates are

    Û = mean_k u_k² / (n p_k)          (of E‖g_U1‖² = (1/n) Σ v_i²)
    R̂ = mean_k (u_k / (n p_k))²        (of E‖g_R1‖² = (1/n²) Σ v_i²/p_i)

and ‖g_R‖² is the squared norm of the minibatch gradient. Each is smoothed by a
bias-corrected exponential moving average (rate α) and r is clipped to
[1, r_max].

With exact norms, ‖g_R‖² = R̂/m + C: its diagonal part Σ_k ‖w_k ∇f_k‖²/m²
is R̂/m exactly, and the off-diagonal part C (the cross terms between
examples) has E C = (1 − 1/m)‖∇F‖², which moves only as training does. So
E‖g_R‖² is estimated as (average of R̂)/m + (average of C): R̂ is averaged
every step, C needs ‖g_R‖² and may be averaged over a subset of steps (the
fast path measures it on the first step of each block, which spares a pass
over the gradient on the others). When every step measures ‖g_R‖², this is
the average of ‖g_R‖² itself.

*Proxy norms* are only proportional to true norms (u ≈ λ v, λ unknown), so the
estimate is made scale-free: ρ = Û / R̂ is the ratio E‖g_U1‖²/E‖g_R1‖², and
the true E‖g_R1‖² comes from the minibatch itself: splitting it into halves A
and B, ⟨g_A, g_B⟩ is unbiased for ‖∇F‖², and
E‖g_R‖² = ‖∇F‖² + (E‖g_R1‖² − ‖∇F‖²)/m gives
E‖g_R1‖² = m (E‖g_R‖² − ‖∇F‖²) + ‖∇F‖². Then r = 1 + (ρ − 1) E‖g_R1‖² / (m E‖g_R‖²).

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp


class GainRatioState(NamedTuple):
  """Exponential moving averages and the weights that bias-correct them."""

  uniform_moment: chex.Array  # EMA of Û
  robust_moment: chex.Array  # EMA of R̂
  grad_sq_norm: chex.Array  # EMA of ‖g_R‖², at the steps that measure it
  grad_diagonal: chex.Array  # EMA of R̂/m at those same steps (exact norms)
  grad_halves_inner: chex.Array  # EMA of ⟨g_A, g_B⟩ (proxy norms only)
  weight: chex.Array  # the EMA of 1 from 0 alongside Û and R̂: their bias
  grad_weight: chex.Array  # the same for the ‖g_R‖² averages
  count: chex.Array  # int32 accepted updates
  skipped: chex.Array  # int32 updates skipped for non-finite inputs


def init() -> GainRatioState:
  # Separate buffers (not one shared zero), so the state can be donated.
  f32 = lambda: jnp.zeros((), jnp.float32)
  return GainRatioState(f32(), f32(), f32(), f32(), f32(), f32(), f32(),
                        jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def update(state: GainRatioState, norms: chex.Array, probs: chex.Array,
           num_examples: int, grad_sq_norm: Optional[chex.Array] = None, *,
           grad_halves_inner: Optional[chex.Array] = None, alpha: float = 0.01,
           grad_alpha: Optional[float] = None) -> GainRatioState:
  """Folds one step's measurements into the moving averages.

  Args:
    state: current averages.
    norms: (m,) measured gradient norms u_k of the sampled examples.
    probs: (m,) their sampling probabilities p_k.
    num_examples: n.
    grad_sq_norm: ‖g_R‖² of this step's (importance-weighted) minibatch
      gradient, or None if this step did not measure it (then only Û and R̂
      are averaged).
    grad_halves_inner: ⟨g_A, g_B⟩ of the two half-minibatch gradients, needed
      by :func:`estimate` with ``scale_free=True`` (with ``grad_sq_norm``).
    alpha: EMA rate of Û and R̂.
    grad_alpha: EMA rate of the ‖g_R‖² averages (default ``alpha``).

  Returns:
    The new state. A step whose inputs are not all finite is skipped and
    counted in ``skipped``.
  """
  m = norms.shape[0]
  scaled = norms / (num_examples * probs)
  robust = jnp.mean(scaled**2)
  rates = {"uniform_moment": alpha, "robust_moment": alpha, "weight": alpha}
  measured: dict[str, chex.Numeric] = {
      "uniform_moment": jnp.mean(norms * scaled), "robust_moment": robust,
      "weight": 1.0}
  if grad_sq_norm is not None:
    grad_alpha = alpha if grad_alpha is None else grad_alpha
    inner = jnp.zeros(()) if grad_halves_inner is None else grad_halves_inner
    for name, x in (("grad_sq_norm", grad_sq_norm), ("grad_diagonal", robust / m),
                    ("grad_halves_inner", inner), ("grad_weight", 1.0)):
      measured[name], rates[name] = x, grad_alpha
  values = {k: jnp.asarray(x, jnp.float32) for k, x in measured.items()}
  finite = jnp.all(jnp.stack([jnp.isfinite(x) for x in values.values()]))
  new = {name: jnp.where(finite, (1 - rates[name]) * getattr(state, name)
                         + rates[name] * x, getattr(state, name))
         for name, x in values.items()}
  accepted = finite.astype(jnp.int32)
  return state._replace(**new, count=state.count + accepted,
                        skipped=state.skipped + 1 - accepted)


class ExactGainRatio(NamedTuple):
  """The true gain ratio at given parameters and distribution, and its parts."""

  ratio: chex.Array  # r = E‖g_U‖² / E‖g_R‖²
  uniform_moment: chex.Array  # E‖g_U1‖² = (1/n) Σ v_i²
  robust_moment: chex.Array  # E‖g_R1‖² = (1/n²) Σ v_i² / p_i
  full_grad_sq_norm: chex.Array  # ‖∇F‖²


def exact(norms: chex.Array, probs: chex.Array, full_grad_sq_norm: chex.Array,
          batch_size: int) -> ExactGainRatio:
  """r from the exact norms v of all n examples, their p and ‖∇F‖².

  E‖g‖² = ‖∇F‖² + (E‖g_1‖² − ‖∇F‖²)/m for a mean of m i.i.d. single-sample
  estimates, so r = E‖g_U‖²/E‖g_R‖² follows from the two single-sample
  moments. O(n): for measuring the estimator, not for training.
  """
  n = norms.shape[0]
  uniform = jnp.mean(norms**2)
  robust = jnp.mean(norms**2 / (n * probs))
  g2 = full_grad_sq_norm
  mean_sq = lambda single: g2 + (single - g2) / batch_size
  return ExactGainRatio(mean_sq(uniform) / mean_sq(robust), uniform, robust, g2)


def estimate(state: GainRatioState, batch_size: int, *,
             r_max: Optional[float] = None,
             scale_free: bool = False) -> chex.Array:
  """The gain ratio r ∈ [1, r_max] (r_max defaults to the batch size m).

  Returns 1 until the first update that measured ‖g_R‖². ``scale_free=True``
  uses the proxy-norm formula (module docstring).
  """
  m = batch_size
  r_max = float(m) if r_max is None else r_max
  # Dividing by the weights corrects the EMAs' start at zero.
  corrected = lambda x, w: x / jnp.where(w > 0, w, 1.0)
  u_mom, r_mom = (corrected(x, state.weight)
                  for x in (state.uniform_moment, state.robust_moment))
  g2, diagonal, inner = (corrected(x, state.grad_weight) for x in (
      state.grad_sq_norm, state.grad_diagonal, state.grad_halves_inner))
  if scale_free:
    rho = u_mom / r_mom
    single = m * (g2 - inner) + inner  # E‖g_R1‖² in true scale
    r = 1.0 + (rho - 1.0) * single / (m * g2)
  else:
    g2 = r_mom / m + (g2 - diagonal)  # E‖g_R‖²: diagonal part, cross terms
    r = 1.0 + (u_mom - r_mom) / (m * g2)
  r = jnp.where((state.grad_weight > 0) & jnp.isfinite(r), r, 1.0)
  return jnp.clip(r, 1.0, r_max)
