"""The point-estimate baselines (rais_jax.baselines.point_estimate): naive
(last norms) and loss (last losses) importance sampling. RAIS's block draws and
fold-ins are tested in test_runner.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rais_jax as rj
from stats_helpers import assert_unbiased_with_power, pooled_chisquare_pvalue

FACTORIES = {"naive": rj.baselines.naive_sampler, "loss": rj.baselines.loss_sampler}


def _measured_state(kind, n=400, floor=0.05, seed=0):
  """A state after values were measured for the first 60% of the examples
  (one NaN and one negative among them: skipped), and the values."""
  smp = FACTORIES[kind](n, batch_size=16, floor=floor)
  state = smp.init()
  rng = np.random.default_rng(seed)
  seen = int(0.6 * n)
  values = rng.lognormal(0, 1, seen).astype(np.float32)
  values[3], values[7] = np.nan, -1.0
  idx = jnp.arange(seen, dtype=jnp.int32)
  p = smp.probabilities(state)[idx]
  sample = rj.Sample(indices=idx, probs=p, weights=1 / (n * p))
  return smp, smp.fold_in(state, sample, jnp.asarray(values)), values


def _expected_p(values, n, floor):
  """The rule: p_i ∝ the last value, never-measured (or skipped) at the mean."""
  v = np.full(n, np.nan)
  ok = np.isfinite(values) & (values >= 0)
  v[:len(values)][ok] = values[ok]
  v[np.isnan(v)] = np.nanmean(v)
  return (1 - floor) * v / v.sum() + floor / n


@pytest.mark.parametrize("kind", ["naive", "loss"])
def test_probabilities_follow_the_last_values(kind):
  smp, state, values = _measured_state(kind)
  p = np.asarray(smp.probabilities(state), np.float64)
  np.testing.assert_allclose(p, _expected_p(values, 400, 0.05), rtol=1e-5)
  assert abs(p.sum() - 1) < 1e-5
  assert int(state.diagnostics.nonfinite_norms) == 2
  # A newer value replaces the old one.
  idx = jnp.asarray([0, 1], jnp.int32)
  sample = rj.Sample(indices=idx, probs=jnp.full((2,), 1 / 400), weights=jnp.ones(2))
  state = smp.fold_in(state, sample, jnp.asarray([5.0, 0.0]))
  values[:2] = [5.0, 0.0]
  np.testing.assert_allclose(smp.probabilities(state),
                             _expected_p(values, 400, 0.05), rtol=1e-5)


@pytest.mark.parametrize("kind", ["naive", "loss"])
def test_uniform_until_something_is_measured(kind):
  smp = FACTORIES[kind](50, batch_size=4)
  state = smp.init()
  np.testing.assert_allclose(smp.probabilities(state), np.full(50, 0.02))
  s = smp.draw(state, jax.random.key(0), (3, 4))
  np.testing.assert_allclose(s.weights, 1.0)


@pytest.mark.parametrize("kind", ["naive", "loss"])
def test_block_draws_match_the_rule_chi_square(kind):
  """(32, 64) draws per block: frequencies against the rule's p; each draw
  carries its p and its weight 1/(n p)."""
  smp, state, values = _measured_state(kind, seed=1)
  draw = jax.jit(lambda k: smp.draw(state, k, (32, 64)))
  samples = [draw(k) for k in jax.random.split(jax.random.key(0), 32)]
  idx = np.concatenate([np.asarray(s.indices).ravel() for s in samples])
  p = _expected_p(values, 400, 0.05)
  for s in samples[:2]:
    np.testing.assert_allclose(s.probs, p[np.asarray(s.indices)], rtol=1e-4)
    np.testing.assert_allclose(s.weights, 1 / (400 * p[np.asarray(s.indices)]),
                               rtol=1e-4)
  counts = np.bincount(idx, minlength=400)
  # p-value uniform under a correct sampler; 1e-3 fails one seed in 1000.
  assert pooled_chisquare_pvalue(counts, p * idx.size) > 1e-3


@pytest.mark.parametrize("kind", ["naive", "loss"])
def test_importance_weighted_gradient_is_unbiased(kind):
  """The test RAIS passes (test_runner): mean over blocks of
  (1/m) Σ_k w_k g_k equals (1/n) Σ_i g_i, per step of the block, on
  gradients correlated with p; a p 1 % too high on half the examples is
  rejected on the same draws."""
  smp, state, _ = _measured_state(kind, n=200, floor=0.1, seed=5)
  s = jax.jit(jax.vmap(lambda key: smp.draw(state, key, (8, 64))))(
      jax.random.split(jax.random.key(7), 4000))
  assert_unbiased_with_power(s.indices, s.weights, smp.probabilities(state))


def test_factories_reject_bad_input():
  with pytest.raises(ValueError, match="floor must lie in"):
    rj.baselines.naive_sampler(10, batch_size=2, floor=0.0)
  # The per-step API serves every method but those that plan whole epochs.
  with pytest.raises(ValueError, match="run_epoch"):
    rj.make_train_step(lambda p, b: b["x"], rj.softmax_cross_entropy_head(),
                       rj.rais_sgd(0.1), rj.baselines.infobatch(
                           10, batch_size=2, num_epochs=1))