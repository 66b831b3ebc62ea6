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

A *coupled* loss (BatchNorm in training mode) has no per-example gradients:
its norms are each example's share of the minibatch gradient
(:mod:`rais_jax.model`), and the shares are strongly anti-correlated (the
batch statistics' backward removes their common part: on a ResNet, Σ‖share‖²
was 3× ‖g_R‖²). The decomposition above then mixes the shares' units (Û − R̂)
with the gradient's (‖g_R‖²) and overstates r. The estimate is then the
ratio of the single-sample moments alone, r = ρ = Û / R̂: it does not depend on
the shares' scale, and it is r when the minibatch gradient's noise dominates
its mean (r = (‖∇F‖² + V_U/m) / (‖∇F‖² + V_R/m) → V_U/V_R), an upper bound
of the scale-free estimate otherwise. Against the Monte Carlo truth
(:func:`sampled`) on that ResNet ρ was −19 % to +12 % off where the
decomposition was +89 % too high (median; docs/results.md).

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax.numpy as jnp


class GainRatioState(NamedTuple):
  """Exponential moving averages and the weights that bias-correct them.

  Each group is one vector, so a step updates it in one fused operation (on
  an accelerator every separate small kernel costs a launch); the properties
  name its entries.
  """

  step_averages: chex.Array  # (3,) EMAs of Û, R̂ and 1 (their bias weight)
  grad_averages: chex.Array  # (4,) the ‖g_R‖² averages and their weight
  count: chex.Array  # int32 accepted updates
  skipped: chex.Array  # int32 updates skipped for non-finite inputs

  @property
  def uniform_moment(self) -> chex.Array:
    """EMA of Û."""
    return self.step_averages[0]

  @property
  def robust_moment(self) -> chex.Array:
    """EMA of R̂."""
    return self.step_averages[1]

  @property
  def weight(self) -> chex.Array:
    """1 − (1 − α)^count: divides out the EMAs' start at 0."""
    return self.step_averages[2]

  @property
  def grad_sq_norm(self) -> chex.Array:
    """EMA of ‖g_R‖², at the steps that measure it."""
    return self.grad_averages[0]

  @property
  def grad_diagonal(self) -> chex.Array:
    """EMA of R̂/m at those steps (exact norms)."""
    return self.grad_averages[1]

  @property
  def grad_halves_inner(self) -> chex.Array:
    """EMA of ⟨g_A, g_B⟩ at those steps (proxy norms)."""
    return self.grad_averages[2]

  @property
  def grad_weight(self) -> chex.Array:
    """The bias weight of the ‖g_R‖² averages."""
    return self.grad_averages[3]


def init() -> GainRatioState:
  # Separate buffers (not one shared zero), so the state can be donated.
  return GainRatioState(jnp.zeros(3, jnp.float32), jnp.zeros(4, jnp.float32),
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
  # Û and R̂ in one reduction.
  moments = jnp.mean(jnp.stack([norms * scaled, scaled * scaled]), axis=1)
  step_x = jnp.concatenate([moments, jnp.ones(1)]).astype(jnp.float32)
  finite = jnp.all(jnp.isfinite(step_x))
  grad_averages = state.grad_averages
  if grad_sq_norm is not None:
    grad_alpha = alpha if grad_alpha is None else grad_alpha
    inner = jnp.zeros(()) if grad_halves_inner is None else grad_halves_inner
    grad_x = jnp.stack([grad_sq_norm, moments[1] / m, inner,
                        jnp.ones(())]).astype(jnp.float32)
    finite &= jnp.all(jnp.isfinite(grad_x))
    grad_averages = jnp.where(finite, grad_averages + grad_alpha * (
        grad_x - grad_averages), grad_averages)
  step_averages = jnp.where(finite, state.step_averages + alpha * (
      step_x - state.step_averages), state.step_averages)
  accepted = finite.astype(jnp.int32)
  return GainRatioState(step_averages, grad_averages, state.count + accepted,
                        state.skipped + 1 - accepted)


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


class SampledGainRatio(NamedTuple):
  """The gain ratio of the step as it trains, by Monte Carlo, and its parts."""

  ratio: chex.Array  # r = E‖g_U‖² / E‖g_R‖², the means of the draws
  uniform_moment: chex.Array  # mean ‖g_U‖² over the uniform draws
  robust_moment: chex.Array  # mean ‖g_R‖² over the draws from p
  standard_error: chex.Array  # of the ratio (delta method)


def sampled(uniform_sq_norms: chex.Array, robust_sq_norms: chex.Array
            ) -> SampledGainRatio:
  """r from D paired draws of ‖g_U‖² and ‖g_R‖² (whole minibatches).

  The ratio of the two means, with its delta-method standard error
  r·sqrt((s_U²/Ū² + s_R²/R̄² − 2 s_UR/(Ū R̄)) / D) (paired draws may share
  their augmentation and dropout keys, hence the covariance).
  """
  u, r = uniform_sq_norms.astype(jnp.float32), robust_sq_norms.astype(jnp.float32)
  d = u.shape[0]
  mu, mr = jnp.mean(u), jnp.mean(r)
  cov = jnp.cov(jnp.stack([u, r]))
  rel_var = (cov[0, 0] / mu**2 + cov[1, 1] / mr**2 - 2 * cov[0, 1] / (mu * mr)) / d
  ratio = mu / mr
  return SampledGainRatio(ratio, mu, mr, ratio * jnp.sqrt(jnp.maximum(rel_var, 0.0)))


def estimate(state: GainRatioState, batch_size: int, *,
             r_max: Optional[float] = None, scale_free: bool = False,
             coupled: bool = False) -> chex.Array:
  """The gain ratio r ∈ [1, r_max] (r_max defaults to the batch size m).

  Returns 1 until the first update that measured ‖g_R‖². ``scale_free=True``
  uses the proxy-norm formula, ``coupled=True`` the moment ratio Û / R̂ of a
  coupled loss's shares (module docstring).
  """
  if scale_free and coupled:
    raise ValueError("scale_free (proxy norms) and coupled (shares of a coupled "
                     "loss's gradient) are two different norms: pass one.")
  m = batch_size
  r_max = float(m) if r_max is None else r_max
  # Dividing by the weights corrects the EMAs' start at zero.
  corrected = lambda x: x[:-1] / jnp.where(x[-1] > 0, x[-1], 1.0)
  u_mom, r_mom = corrected(state.step_averages)
  g2, diagonal, inner = corrected(state.grad_averages)
  if coupled:
    r = u_mom / r_mom
  elif scale_free:
    rho = u_mom / r_mom
    single = m * (g2 - inner) + inner  # E‖g_R1‖² in true scale
    r = 1.0 + (rho - 1.0) * single / (m * g2)
  else:
    g2 = r_mom / m + (g2 - diagonal)  # E‖g_R‖²: diagonal part, cross terms
    r = 1.0 + (u_mom - r_mom) / (m * g2)
  r = jnp.where((state.grad_weight > 0) & jnp.isfinite(r), r, 1.0)
  return jnp.clip(r, 1.0, r_max)
