"""Property-based tests (hypothesis): no p_i reaches 0 and the gain ratio
stays finite in [1, r_max], whatever the norms."""

import functools

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import problems
import rais_jax as rj
from rais_jax import gain_ratio

N, M, R_MAX = 40, 8, 8.0
# Adversarial norms: zeros, tiny, huge, infinities and NaNs.
# (Bounds are powers of two: exactly representable in float32.)
ADVERSARIAL = st.one_of(st.floats(0.0, 2.0**100, width=32), st.sampled_from(
    [0.0, 2.0**-100, 2.0**100, np.inf, -np.inf, np.nan, -1.0]))
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@SETTINGS
@given(features=hnp.arrays(np.float32, (N, 3), elements=st.floats(0, 2.0**20, width=32)),
       c=hnp.arrays(np.float32, 3, elements=st.floats(0, 2.0**20, width=32)),
       d=hnp.arrays(np.float32, 3, elements=st.floats(0, 2.0**20, width=32)),
       floor=st.floats(1e-6, 0.5))
def test_robust_probabilities_never_zero(features, c, d, floor):
  p = np.asarray(jax.jit(functools.partial(rj.robust_probabilities, floor=floor))(
      c, d, features))
  assert np.all(np.isfinite(p)) and np.all(p > 0)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-4)
  # Where a + k b has mass, the floor bounds every p_i from below.
  if (features @ c + features @ d).sum() > 0:
    assert np.all(p >= floor / N * (1 - 1e-4))


@jax.jit
def _moments_and_estimates(norms, probs, g2, inner):
  state = gain_ratio.init()
  for k in range(norms.shape[0]):
    state = gain_ratio.update(state, norms[k], probs[k], N, g2[k],
                              grad_halves_inner=inner[k])
  return tuple(gain_ratio.estimate(state, M, r_max=R_MAX, scale_free=s)
               for s in (False, True))


@SETTINGS
@given(norms=hnp.arrays(np.float32, (5, M), elements=ADVERSARIAL),
       probs=hnp.arrays(np.float32, (5, M), elements=st.floats(2.0**-40, 1.0, width=32)),
       g2=hnp.arrays(np.float32, 5, elements=ADVERSARIAL),
       inner=hnp.arrays(np.float32, 5, elements=st.one_of(
           st.floats(-2.0**100, 2.0**100, width=32), st.sampled_from([np.nan, np.inf]))))
def test_gain_ratio_finite_and_clipped(norms, probs, g2, inner):
  for r in _moments_and_estimates(norms, probs, g2, inner):
    assert np.isfinite(r) and 1.0 <= float(r) <= R_MAX


def _sampler():
  labels = np.arange(N) % 4
  return rj.rais_sampler(rj.default_features(labels, 4), batch_size=M, buffer_size=16,
                         pt_mode="sync", r_max=R_MAX, pt_delay=1)


@functools.lru_cache(maxsize=None)
def _run_steps():
  sampler = _sampler()

  @jax.jit
  def run(norms, g2, key):
    def body(carry, xs):
      u, g, k = xs
      carry, (sample, _) = problems.synthetic_step(sampler, carry, k, lambda i: u, g)
      r = rj.gain_ratio.estimate(carry[1], M, r_max=R_MAX)
      return carry, (r, sample.probs)
    keys = jax.random.split(key, norms.shape[0])
    (state, _, _), (r, probs) = jax.lax.scan(
        body, problems.synthetic_start(sampler), (norms, g2, keys))
    return state, r, probs, sampler.probabilities(state)

  return run


@SETTINGS
@given(norms=hnp.arrays(np.float32, (12, M), elements=ADVERSARIAL),
       g2=hnp.arrays(np.float32, 12, elements=ADVERSARIAL),
       seed=st.integers(0, 2**16))
def test_sampler_survives_adversarial_norms(norms, g2, seed):
  """12 steps (several (PT) solves) fed arbitrary norms: sampled and full
  probabilities stay positive and finite, r in [1, r_max], and every
  non-finite or negative norm is counted."""
  state, r, sampled_p, p = _run_steps()(norms, g2, jax.random.key(seed))
  r, sampled_p, p = map(np.asarray, (r, sampled_p, p))
  assert np.all(np.isfinite(r)) and np.all((r >= 1) & (r <= R_MAX))
  assert np.all(np.isfinite(sampled_p)) and np.all(sampled_p > 0)
  assert np.all(np.isfinite(p)) and np.all(p > 0)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-3)
  bad = ~np.isfinite(norms) | (norms < 0)
  assert int(state.diagnostics.nonfinite_norms) == int(bad.sum())
