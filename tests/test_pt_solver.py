import jax
import numpy as np
import optax
import pytest
from scipy import optimize

from rais_jax.pt import pt_constraint, solve_pt
from rais_jax.pt.solver import projection_weighted_simplex


def _instance(seed, records=120, d_r=4, n=300):
  rng = np.random.default_rng(seed)
  all_features = rng.uniform(0, 1, (n, d_r))
  all_features[:, 0] = 1.0  # a constant feature keeps every b_i > 0 possible
  p = rng.uniform(0.5, 2.0, n)
  p /= p.sum()
  idx = rng.choice(n, records, p=p)
  feats = all_features[idx]
  norms = feats @ rng.uniform(0, 1, d_r) + rng.normal(0, 0.3, records) ** 2
  return feats, norms, p[idx], all_features.sum(0)


def _scipy_reference(feats, norms, probs, s):
  """(PT) as written: min ⟨d, S⟩ s.t. G(c, d) ≤ 1, c, d ≥ 0, by SLSQP."""
  d_r = feats.shape[1]

  def g(x):
    c, d = x[:d_r], x[d_r:]
    den = np.maximum(probs * (feats @ d), 1e-300)
    return np.mean((norms - feats @ c) ** 2 / den)

  best = None
  for scale in (1.0, 10.0, 100.0):
    x0 = np.concatenate([np.zeros(d_r), np.full(d_r, scale * 1e3 / s.sum())])
    res = optimize.minimize(lambda x: x[d_r:] @ s, x0, method="SLSQP",
                            bounds=[(0, None)] * (2 * d_r),
                            constraints=[{"type": "ineq", "fun": lambda x: 1 - g(x)}],
                            options={"maxiter": 3000, "ftol": 1e-12})
    if g(res.x) <= 1 + 1e-6 and (best is None or res.fun < best.fun):
      best = res
  assert best is not None
  return best.fun


@pytest.mark.parametrize("seed", range(4))
def test_matches_scipy(seed):
  feats, norms, probs, s = _instance(seed)
  c, d, info = solve_pt(feats, norms, probs, s)
  assert bool(info.ok) and bool(info.converged)
  assert np.all(np.asarray(c) >= 0) and np.all(np.asarray(d) >= 0)
  # Constraint G(c, d) ≤ 1, tight at the optimum (float32 rounding allowed).
  g = float(pt_constraint(c, d, feats, norms, probs))
  assert g <= 1 + 1e-4 and abs(g - float(info.constraint)) < 1e-4
  objective = float(np.asarray(d, np.float64) @ s)
  np.testing.assert_allclose(objective, float(info.objective), rtol=1e-4)
  reference = _scipy_reference(feats, norms, probs, s)
  # Within 1% of the reference, and not better than it by more than 1%
  # (ours is float32; both are local solvers of a convex problem).
  assert abs(objective - reference) <= 0.01 * reference


def test_warm_start_converges_faster_to_same_point():
  feats, norms, probs, s = _instance(7)
  c, d, cold = solve_pt(feats, norms, probs, s)
  _, _, warm = solve_pt(feats, norms, probs, s, init=(c, d))
  assert int(warm.iterations) < int(cold.iterations)
  np.testing.assert_allclose(warm.objective, cold.objective, rtol=1e-4)


def test_unused_feature_gets_zero_width():
  feats, norms, probs, s = _instance(3)
  feats = np.concatenate([feats, np.zeros((len(norms), 1))], 1)
  s = np.append(s, 0.0)
  _, d, info = solve_pt(feats, norms, probs, s)
  assert bool(info.ok) and float(d[-1]) == 0.0


def test_exact_fit_gives_tiny_width():
  """When a_i explains every norm exactly, the best uncertainty set is tiny."""
  rng = np.random.default_rng(0)
  feats = rng.uniform(0.1, 1, (200, 3))
  norms = feats @ np.array([0.5, 1.0, 0.2])
  probs = np.full(200, 1 / 200)
  c, d, info = solve_pt(feats, norms, probs, feats.sum(0))
  assert bool(info.ok)
  assert float(info.objective) < 1e-3 * float(np.sum(norms) ** 2)
  np.testing.assert_allclose(feats @ np.asarray(c), norms, rtol=1e-2)


def _weighted_simplex_reference(v, w, mask):
  """argmin Σ w_k (x_k − v_k)² on the simplex, by bisection on λ in float64:
  x(λ) = max(v − λ/w, 0) on the mask, and Σ x(λ) = 1."""
  v, w = v[mask].astype(np.float64), w[mask].astype(np.float64)
  lo, hi = np.min(v * w) - np.max(w), np.max(v * w)  # Σ x(lo) ≥ 1 ≥ Σ x(hi) = 0
  for _ in range(200):
    lam = 0.5 * (lo + hi)
    lo, hi = (lam, hi) if np.maximum(v - lam / w, 0).sum() > 1 else (lo, lam)
  out = np.zeros(mask.shape)
  out[mask] = np.maximum(v - lo / w, 0)
  return out


@pytest.mark.parametrize("seed", range(3))
def test_weighted_simplex_projection(seed):
  rng = np.random.default_rng(seed)
  for size in (1, 2, 13, 40):
    v = rng.normal(0, 2, size).astype(np.float32)
    w = rng.lognormal(0, 2, size).astype(np.float32)  # weights over ~4 decades
    mask = rng.uniform(size=size) < 0.8
    mask[rng.integers(size)] = True
    x = np.asarray(jax.jit(projection_weighted_simplex)(v, w, mask))
    assert np.all(x >= 0) and np.all(x[~mask] == 0)
    np.testing.assert_allclose(x.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(x, _weighted_simplex_reference(v, w, mask), atol=1e-5)
    # With unit weights it is the Euclidean projection.
    np.testing.assert_allclose(
        jax.jit(projection_weighted_simplex)(v, np.ones_like(w)),
        jax.jit(optax.projections.projection_simplex)(v), atol=1e-6)


def test_badly_scaled_features():
  """Scaling feature k by α maps the solution to c_k/α, d_k/α with the same
  optimum. With α = 10³ (like RAIS's last-norm feature next to one-hot
  classes) the preconditioned solver still finds it."""
  feats, norms, probs, s = _instance(5)
  c, d, info = solve_pt(feats, norms, probs, s)
  scale = np.array([1.0, 1.0, 1.0, 1e3])
  c2, d2, info2 = solve_pt(feats * scale, norms, probs, s * scale)
  assert bool(info2.ok) and bool(info2.converged)
  np.testing.assert_allclose(info2.objective, info.objective, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(c2) * scale, c, rtol=1e-2, atol=1e-3 * np.max(c))
  np.testing.assert_allclose(np.asarray(d2) * scale, d, rtol=1e-2, atol=1e-3 * np.max(d))


def test_solves_in_float32_under_x64():
  feats, norms, probs, s = _instance(1)
  c32, _, info32 = solve_pt(feats, norms, probs, s)
  with jax.enable_x64(True):
    c, d, info = solve_pt(feats, norms, probs, s)
  assert c.dtype == d.dtype == np.float32 and bool(info.ok)
  np.testing.assert_allclose(info.objective, info32.objective, rtol=1e-5)
