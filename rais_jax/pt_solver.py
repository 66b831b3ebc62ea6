"""(PT): learning the uncertainty set from recent gradient-norm measurements.

Given records j = 1 … ``|D|`` of features s̃_j (taken just before the example was
measured), measured norms ṽ_j and sampling probabilities p_j, and the feature
sum S = Σ_i s_i over all n examples, (PT) is

    min_{c,d ≥ 0} ⟨d, S⟩   s.t.   G(c, d) ≤ 1,
    G(c, d) = (1/``|D|``) Σ_j (ṽ_j − ⟨c, s̃_j⟩)² / (p_j ⟨d, s̃_j⟩).

G is an importance-weighted, unbiased estimate of Σ_i (v_i − a_i)² / b_i. It is
jointly convex (quadratic over linear) and G(c, t·d) = G(c, d)/t, so (PT) is
the convex problem

    G_min = min { G(c, d) : c ≥ 0, d ≥ 0, ⟨d, S⟩ = 1 },

after which d* = G_min · d makes the constraint tight and ⟨d*, S⟩ = G_min.

We solve it by accelerated projected gradient (FISTA with backtracking line
search and function-value restarts) in the variables c̄ = c/σ (σ = rms of ṽ)
and z_j = S_j d_j, so that d's constraint set is the probability simplex
(``optax.projections.projection_simplex``) and c's is the non-negative orthant.
Features with S_j = 0 do not enter any current b_i and get d_j = 0.
Denominators ⟨d, s̃_j⟩ are floored to keep G finite.

Reference: Johnson & Guestrin, NeurIPS 2018 (problem (PT)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

# Denominators ⟨z, t_j⟩ are kept ≥ this fraction of their typical size.
_DENOMINATOR_FLOOR = 1e-6
# Projection sends masked (S_j = 0) coordinates far below any threshold.
_MASKED = -1e9
# Iterations between checks of relative progress.
_CHECK_EVERY = 10


# Full float32 matmuls: GPUs default to TF32 (10-bit mantissa), which put the
# objective 5.8% above SciPy's on an H200.
_matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


class PTInfo(NamedTuple):
  """Diagnostics of one (PT) solve."""

  iterations: chex.Array  # int32
  converged: chex.Array  # bool: step below tol, or progress below rtol
  objective: chex.Array  # ⟨d*, S⟩ = G_min
  constraint: chex.Array  # G(c*, d*), 1 at a tight solution
  step_norm: chex.Array  # last L·‖x⁺ − y‖ of the normalised problem
  ok: chex.Array  # bool: all outputs finite


class _Problem(NamedTuple):
  resid_target: chex.Array  # ṽ/σ, (D,)
  feats_t: chex.Array  # s̃ transposed, (d_R, D): XLA:CPU's skinny matmuls
                       # are ~4x faster with D contiguous
  inv_sum: chex.Array  # 1 / S_k (0 where S_k = 0), (d_R,)
  den_scale: chex.Array  # typical ⟨z, t⟩ / (p_j · mean(1/p)), (D,)
  den_floor: chex.Array  # floor on ⟨z, t_j⟩ (scalar)
  active: chex.Array  # S_k > 0, (d_R,)


def _objective(x: tuple[chex.Array, chex.Array], prob: _Problem) -> chex.Array:
  """Ĝ(c̄, z) = mean_j (ṽ_j/σ − ⟨c̄, s̃_j⟩)² · den_scale_j / ⟨z, t_j⟩.

  t_j = s̃_j / S, so both inner products come from one pass over s̃ (the
  solve is memory-bound at ``|D|`` = 65536).
  """
  c_bar, z = x
  both = _matmul(jnp.stack([c_bar, z * prob.inv_sum]), prob.feats_t)  # (2, D)
  resid = prob.resid_target - both[0]
  den = jnp.maximum(both[1], prob.den_floor)
  return jnp.mean(resid**2 * prob.den_scale / den)


def _project(x, prob: _Problem):
  c_bar, z = x
  z = optax.projections.projection_simplex(jnp.where(prob.active, z, _MASKED))
  return jnp.maximum(c_bar, 0.0), jnp.where(prob.active, z, 0.0)


def _sq_norm(x) -> chex.Array:
  return sum(jnp.sum(v**2) for v in x)


class _FistaState(NamedTuple):
  x: tuple
  y: tuple
  f_x: chex.Array
  momentum: chex.Array
  lipschitz: chex.Array
  step_norm: chex.Array
  f_check: chex.Array  # f_x at the last convergence check
  stalled: chex.Array  # bool: < rtol relative progress over a check window
  iteration: chex.Array


@functools.partial(jax.jit, static_argnames=("max_iters",))
def solve_pt(features: chex.Array, norms: chex.Array, probs: chex.Array,
             feature_sum: chex.Array, *,
             init: Optional[tuple[chex.Array, chex.Array]] = None,
             max_iters: int = 1000, tol: float = 1e-6, rtol: float = 1e-4
             ) -> tuple[chex.Array, chex.Array, PTInfo]:
  """Solves (PT) for the uncertainty-set parameters (c, d).

  Args:
    features: (``|D|``, d_R) non-negative features s̃_j of the recorded examples.
    norms: (``|D|``,) their measured gradient norms ṽ_j.
    probs: (``|D|``,) the probabilities p_j with which they were sampled.
    feature_sum: (d_R,) S = Σ_i s_i over all n examples now.
    init: optional warm start (c, d) (any positive scale of d is fine).
    max_iters: cap on projected-gradient iterations.
    tol: stop when the projected-gradient step (times the line-search
      Lipschitz estimate) of the normalised problem is below ``tol``, ...
    rtol: ... or when the objective improved by less than ``rtol`` (relative)
      over the last ``_CHECK_EVERY`` iterations (float32 rounding usually
      stops progress before the step gets below ``tol``).

  Returns:
    (c, d, info): c, d ≥ 0 of shape (d_R,) with G(c, d) = 1 at the solution,
    and a :class:`PTInfo`.
  """
  chex.assert_rank([features, norms, probs, feature_sum], [2, 1, 1, 1])
  dtype = jnp.float32
  features, norms, probs, feature_sum = (
      jnp.asarray(v, dtype) for v in (features, norms, probs, feature_sum))
  d_r = features.shape[1]

  sigma = jnp.sqrt(jnp.mean(norms**2))
  sigma = jnp.where(sigma > 0, sigma, 1.0)
  active = feature_sum > 0
  inv_sum = jnp.where(active, 1.0 / jnp.where(active, feature_sum, 1.0), 0.0)
  n_active = jnp.maximum(active.sum(), 1)
  typical = jnp.mean(_matmul(features, inv_sum)) / n_active  # ⟨z, t_j⟩ at z uniform
  typical = jnp.where(typical > 0, typical, 1.0)
  inv_p = 1.0 / jnp.maximum(probs, jnp.finfo(dtype).tiny)
  mean_inv_p = jnp.mean(inv_p)
  # Ĝ is G rescaled to O(1): G = σ² · mean(1/p) / typical · Ĝ.
  prob = _Problem(resid_target=norms / sigma, feats_t=features.T, inv_sum=inv_sum,
                  den_scale=typical * inv_p / mean_inv_p,
                  den_floor=_DENOMINATOR_FLOOR * typical, active=active)
  g_factor = sigma**2 * mean_inv_p / typical

  if init is None:
    x0 = (jnp.zeros((d_r,), dtype), jnp.where(active, 1.0 / n_active, 0.0))
  else:
    c0, d0 = (jnp.asarray(v, dtype) for v in init)
    z0 = jnp.maximum(d0, 0.0) * feature_sum
    z0 = jnp.where(z0.sum() > 0, z0 / jnp.where(z0.sum() > 0, z0.sum(), 1.0),
                   jnp.where(active, 1.0 / n_active, 0.0))
    x0 = _project((jnp.nan_to_num(c0) / sigma, jnp.nan_to_num(z0)), prob)

  value_and_grad = jax.value_and_grad(_objective)

  def step(s: _FistaState) -> _FistaState:
    f_y, g_y = value_and_grad(s.y, prob)

    def trial(lipschitz):
      x_new = _project(jax.tree.map(lambda a, g: a - g / lipschitz, s.y, g_y), prob)
      diff = jax.tree.map(jnp.subtract, x_new, s.y)
      model = (f_y + sum(jnp.vdot(g, dv) for g, dv in zip(g_y, diff))
               + 0.5 * lipschitz * _sq_norm(diff))
      return x_new, _objective(x_new, prob), model, diff

    def too_big(carry):
      _, (_, f_new, model, _), k = carry
      return (~(f_new <= model * (1 + 1e-6))) & (k < 60)

    def backtrack(carry):
      lipschitz, _, k = carry
      return lipschitz * 2.0, trial(lipschitz * 2.0), k + 1

    lipschitz0 = s.lipschitz * 0.7
    lipschitz, (x_new, f_new, _, diff), _ = jax.lax.while_loop(
        too_big, backtrack, (lipschitz0, trial(lipschitz0), 0))
    step_norm = lipschitz * jnp.sqrt(_sq_norm(diff))

    # Restart momentum (and keep x) when the objective went up.
    restart = f_new > s.f_x
    momentum = jnp.where(restart, 1.0,
                         0.5 * (1 + jnp.sqrt(1 + 4 * s.momentum**2)))
    beta = (s.momentum - 1) / momentum
    x_next = jax.tree.map(lambda a, b: jnp.where(restart, a, b), s.x, x_new)
    y_next = jax.tree.map(
        lambda a, b: jnp.where(restart, a, b + beta * (b - a)), s.x, x_new)
    y_next = _project(y_next, prob)
    f_x = jnp.minimum(f_new, s.f_x)
    iteration = s.iteration + 1
    check = iteration % _CHECK_EVERY == 0
    stalled = check & (s.f_check - f_x <= rtol * jnp.abs(f_x))
    return _FistaState(x=x_next, y=y_next, f_x=f_x, momentum=momentum,
                       lipschitz=lipschitz, step_norm=step_norm,
                       f_check=jnp.where(check, f_x, s.f_check),
                       stalled=stalled, iteration=iteration)

  def converged(s: _FistaState):
    return (s.step_norm <= tol) | s.stalled

  def not_done(s: _FistaState):
    return (s.iteration < max_iters) & ~converged(s) & jnp.isfinite(s.f_x)

  f0 = _objective(x0, prob)
  state = _FistaState(x=x0, y=x0, f_x=f0, momentum=jnp.ones((), dtype),
                      lipschitz=jnp.ones((), dtype),
                      step_norm=jnp.full((), jnp.inf, dtype),
                      f_check=f0, stalled=jnp.zeros((), bool),
                      iteration=jnp.zeros((), jnp.int32))
  state = jax.lax.while_loop(not_done, step, state)

  c_bar, z = state.x
  g_min = g_factor * state.f_x
  c = sigma * c_bar
  d = jnp.where(active, z / jnp.where(active, feature_sum, 1.0), 0.0) * g_min
  constraint = pt_constraint(c, d, features, norms, probs)
  ok = jnp.isfinite(g_min) & jnp.all(jnp.isfinite(c)) & jnp.all(jnp.isfinite(d))
  info = PTInfo(iterations=state.iteration, converged=converged(state),
                objective=g_min, constraint=constraint,
                step_norm=state.step_norm, ok=ok)
  return c, d, info


def pt_constraint(c: chex.Array, d: chex.Array, features: chex.Array,
                  norms: chex.Array, probs: chex.Array) -> chex.Array:
  """G(c, d) = (1/``|D|``) Σ_j (ṽ_j − ⟨c, s̃_j⟩)² / (p_j ⟨d, s̃_j⟩) (no floor)."""
  resid = norms - _matmul(features, c)
  return jnp.mean(resid**2 / (probs * _matmul(features, d)))
