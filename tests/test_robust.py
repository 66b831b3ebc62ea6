import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from rais_jax import robust_probabilities, worst_case_second_moment


def _instance(seed, n=5, d_r=3):
  rng = np.random.default_rng(seed)
  features = rng.uniform(0, 1, (n, d_r)).astype(np.float64)
  c = rng.uniform(0, 1, d_r)
  d = rng.uniform(0.05, 1, d_r)
  return c, d, features


def _worst_case(p, a, b):
  """max over the ellipsoid of Σ v²/p, numerically (maximising a convex
  function: take the best of many local solves from random starts)."""
  n = len(a)
  best = -np.inf
  rng = np.random.default_rng(0)
  cons = [{"type": "ineq", "fun": lambda v: 1 - np.sum((v - a) ** 2 / b)}]
  for _ in range(40):
    direction = rng.normal(size=n)
    v0 = np.maximum(a + np.sqrt(b) * direction / np.linalg.norm(direction) * 0.99, 0)
    res = optimize.minimize(lambda v: -np.sum(v**2 / p), v0, constraints=cons,
                            bounds=[(0, None)] * n, method="SLSQP")
    if res.success or res.status == 8:
      if np.sum((res.x - a) ** 2 / b) <= 1 + 1e-6:
        best = max(best, -res.fun)
  return best


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_is_minimax(seed):
  """p ∝ a + k b minimises the worst case; its value is (Σa + √Σb)²."""
  c, d, features = _instance(seed)
  a, b = features @ c, features @ d
  p_star = np.asarray(robust_probabilities(c, d, features), np.float64)
  value = _worst_case(p_star, a, b)
  expected = float(worst_case_second_moment(c, d, features))
  np.testing.assert_allclose(value, expected, rtol=1e-3)
  # Brute force over the simplex: no other p has a smaller worst case.
  rng = np.random.default_rng(seed + 100)
  for _ in range(15):
    q = p_star * np.exp(rng.normal(0, 0.3, len(a)))
    q /= q.sum()
    assert _worst_case(q, a, b) >= value * (1 - 1e-4)


def test_floor_and_normalisation():
  c, d, features = _instance(0, n=50)
  p = robust_probabilities(c, d, features, floor=0.1)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  assert float(p.min()) >= 0.1 / 50


@pytest.mark.parametrize("bad, msg", [
    (dict(c=-jnp.ones(3)), "non-negative"),
    (dict(d=jnp.ones(4)), "shape"),
    (dict(features=jnp.ones(3)), "shape"),
    (dict(c=jnp.zeros(3), d=jnp.zeros(3)), "zero"),
    (dict(floor=1.0), "floor"),
])
def test_errors(bad, msg):
  args = dict(c=jnp.ones(3), d=jnp.ones(3), features=jnp.ones((4, 3)))
  floor = bad.pop("floor", 0.0)
  args.update(bad)
  with pytest.raises(ValueError, match=msg):
    robust_probabilities(args["c"], args["d"], args["features"], floor=floor)
