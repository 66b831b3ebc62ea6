import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import problems
import rais_jax as rj
from rais_jax.pt import solver as pt_solver
from stats_helpers import assert_unbiased_with_power, pool, pooled_chisquare_pvalue


_fitted = problems.fitted_sampler


def _draw(sampler, state, batches, seed=0):
  keys = jax.random.split(jax.random.key(seed), batches)
  return jax.jit(jax.vmap(sampler.sample, in_axes=(None, 0)))(state, keys)


def test_uniform_until_fitted():
  sampler = rj.rais_sampler(rj.default_features(np.arange(10) % 2, 2), batch_size=4)
  s = sampler.sample(sampler.init(), jax.random.key(0))
  np.testing.assert_allclose(s.probs, 0.1)
  np.testing.assert_allclose(s.weights, 1.0)


def test_probabilities_match_robust_closed_form():
  sampler, state, fmap, c, d = _fitted()
  p = sampler.probabilities(state)
  features = fmap.compute(state.features, None)
  np.testing.assert_allclose(p, rj.robust_probabilities(c, d, features, floor=0.05),
                             rtol=1e-5)


def test_frequencies_chi_square_with_duplicates():
  """m = 256 draws from n = 1000 per batch, so batches contain duplicates."""
  sampler, state, _, _, _ = _fitted()
  batches = 2000
  s = _draw(sampler, state, batches)
  idx = np.asarray(s.indices)
  assert max(len(b) - len(np.unique(b)) for b in idx) > 0  # duplicates occur
  p = np.asarray(sampler.probabilities(state), np.float64)
  # Reported probabilities are those of the drawn indices.
  np.testing.assert_allclose(np.asarray(s.probs), p[idx], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.weights), 1 / (1000 * p[idx]), rtol=1e-4)
  counts = np.bincount(idx.ravel(), minlength=1000)
  # p-value is uniform under a correct sampler; 1e-3 is a one-in-a-thousand
  # false alarm for a random seed (the seed is fixed).
  assert pooled_chisquare_pvalue(counts, p * idx.size) > 1e-3


def test_agrees_with_jax_random_choice():
  """Two-sample test against the O(n) reference sampler."""
  sampler, state, _, _, _ = _fitted(seed=3)
  p = sampler.probabilities(state)
  batches = 1000
  ours = np.asarray(_draw(sampler, state, batches, seed=1).indices).ravel()
  ref = np.asarray(jax.random.choice(jax.random.key(2), 1000, (ours.size,), p=p))
  a, b = np.bincount(ours, minlength=1000), np.bincount(ref, minlength=1000)
  table = np.stack(pool((a + b) >= 10, a, b))
  assert stats.chi2_contingency(table).pvalue > 1e-3


def test_importance_weighted_gradient_is_unbiased():
  """mean over draws of (1/m) Σ w_k ∇f_k equals ∇F for a logistic model."""
  n, m, dim = 60, 8, 3
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, n), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=dim), jnp.float32)
  per_example = jax.vmap(jax.grad(
      lambda w, xi, yi: jnp.logaddexp(0.0, xi @ w) - yi * (xi @ w)), (None, 0, 0))
  grads = per_example(w0, x, y)
  full = grads.mean(0)
  sampler = rj.oracle_sampler(n, batch_size=m, floor=0.05)
  state = sampler.refresh(sampler.init(), jnp.linalg.norm(grads, axis=1) ** 0.5)
  s = _draw(sampler, state, 40_000)
  estimates = (s.weights[..., None] * grads[s.indices]).mean(1)  # (draws, dim)
  mean = np.asarray(estimates.mean(0))
  sem = np.asarray(estimates.std(0)) / np.sqrt(estimates.shape[0])
  # Each coordinate's z-score is ~N(0, 1); |z| < 4 fails a correct sampler
  # with probability < 2e-4 per coordinate.
  assert np.all(np.abs(mean - np.asarray(full)) < 4 * sem)
  # ...and the variance is smaller than uniform sampling's (it is p ∝ √v here).
  uniform_var = np.asarray(grads.var(0) / m).sum()
  assert float(estimates.var(0).sum()) < uniform_var


def _feed(sampler, carry, steps, norms_fn, seed=0):
  """Runs per-step updates with synthetic norms for a number of steps, from
  ``carry`` (sampler state, moments, step; None: a fresh one)."""
  def body(carry, key):
    return problems.synthetic_step(sampler, carry, key, norms_fn, 1.0,
                                   jnp.float32(0.5))[0], None
  keys = jax.random.split(jax.random.key(seed), steps)
  carry = problems.synthetic_start(sampler) if carry is None else carry
  return jax.jit(lambda c, k: jax.lax.scan(body, c, k)[0])(carry, keys)


def _true_norms(n, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  v = jnp.asarray(rng.lognormal(0, 1, n) * (1 + labels), jnp.float32)
  return labels, v


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_pt_schedule_and_learning(mode):
  n, m = 400, 20
  labels, v = _true_norms(n)
  sampler = rj.rais_sampler(rj.default_features(labels, 3), batch_size=m,
                            buffer_size=200, pt_mode=mode, pt_delay=3)
  period = 10  # ⌈200 / 20⌉
  carry = _feed(sampler, None, period + 2, lambda i: v[i])
  state = carry[0]
  assert not bool(state.fitted) and int(state.pending.due) == period + 3
  carry = _feed(sampler, carry, 1, lambda i: v[i])
  state = carry[0]
  assert bool(state.fitted) and int(state.diagnostics.pt_solves) == 1
  assert int(state.pending.due) == -1
  # After a few solves, examples with larger true norms are sampled more.
  carry = _feed(sampler, carry, 10 * period, lambda i: v[i], seed=1)
  state = carry[0]
  p = np.asarray(sampler.probabilities(state))
  assert np.corrcoef(p, np.asarray(v))[0, 1] > 0.5
  assert int(state.diagnostics.pt_failures) == 0


def test_nonfinite_norms_are_skipped_and_counted():
  n, m = 100, 10
  labels, v = _true_norms(n)
  sampler = rj.rais_sampler(rj.default_features(labels, 3), batch_size=m,
                            pt_mode="sync")
  bad = lambda i: jnp.where(i % 2 == 0, jnp.nan, v[i])
  carry = _feed(sampler, None, 30, bad)
  state = carry[0]
  assert int(state.diagnostics.nonfinite_norms) > 0
  # About half the measurements are skipped, so D (|D| = 100, m = 10) holds
  # ~50 records at step 10: no solve is submitted then, only at step 20 (due
  # at 25). Without that guard there would be two solves by step 30.
  assert int(state.diagnostics.pt_solves) == 1
  assert np.all(np.isfinite(np.asarray(state.records.norms)))
  assert np.all(np.isfinite(np.asarray(state.features.last_norm)))
  assert np.all(np.asarray(state.features.last_norm)[::2] == 0)
  assert bool(state.fitted)
  assert np.all(np.asarray(sampler.probabilities(state)) > 0)


@pytest.mark.parametrize("mode, failure", [("sync", "nan"), ("async", "raise")])
def test_failed_solve_keeps_previous_parameters(monkeypatch, mode, failure):
  monkeypatch.setattr(pt_solver, "solve_pt", problems.broken_solver(failure))
  labels, v = _true_norms(100)
  sampler = rj.rais_sampler(rj.default_features(labels, 3), batch_size=10,
                            pt_mode=mode)
  carry = _feed(sampler, None, 40, lambda i: v[i])
  state = carry[0]
  assert int(state.diagnostics.pt_failures) >= 2
  assert int(state.diagnostics.pt_solves) == 0
  assert not bool(state.fitted)
  np.testing.assert_array_equal(state.c, 0.0)
  s = sampler.sample(state, jax.random.key(0))
  np.testing.assert_allclose(s.probs, 1 / 100)


def test_oracle_sampler_proportional_to_norms():
  sampler = rj.oracle_sampler(5, batch_size=2, floor=0.5)
  state = sampler.refresh(sampler.init(), jnp.array([0.0, 1.0, 1.0, 2.0, jnp.inf]))
  np.testing.assert_allclose(sampler.probabilities(state),
                             [0.1, 0.225, 0.225, 0.35, 0.1], rtol=1e-6)
  assert int(state.diagnostics.nonfinite_norms) == 1


def test_oracle_default_floor_bounds_the_weights():
  """A stale oracle cannot blow up a step: with the default ε = 0.3 every
  importance weight 1/(n p_i) is at most 1/ε, however skewed the norms."""
  n = 1000
  sampler = rj.oracle_sampler(n, batch_size=64)
  norms = jnp.concatenate([jnp.full((1,), 1e6), jnp.full((n - 1,), 1e-6)])
  state = sampler.refresh(sampler.init(), norms)
  weights = 1.0 / (n * sampler.probabilities(state))
  assert float(weights.max()) <= 1 / 0.3 + 1e-4
  assert float(weights.max()) > 3.0  # the bound is attained by the small norms


def test_uniform_sampler_keeps_no_state_and_measures_nothing():
  sampler = rj.uniform_sampler(50, batch_size=5)
  carry = _feed(sampler, None, 5, lambda i: jnp.ones(5))
  state = carry[0]
  assert int(carry[2]) == 5 and state == rj.sampler.UniformState()
  assert not sampler.boosts_lr and not sampler.measures_norms  # r = 1, no norms


@pytest.mark.parametrize("kwargs, msg", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=4, floor=0.0), "floor"),
    (dict(batch_size=4, pt_delay=99), "pt_delay"),
    (dict(batch_size=4, pt_period=1), "pt_period"),
    (dict(batch_size=4, pt_mode="later"), "pt_mode"),
])
def test_config_errors(kwargs, msg):
  with pytest.raises(ValueError, match=msg):
    rj.rais_sampler(rj.default_features(np.arange(20) % 2, 2), **kwargs)


# -- a method defined here alone --------------------------------------------


def _label_frequency_sampler(labels, classes, batch_size):
  """A toy method, defined in this test file only: p_i ∝ how common i's class
  is (importance weights 1/(n p_i) keep the gradient unbiased)."""
  labels = jnp.asarray(labels)
  n = labels.shape[0]
  counts = jnp.bincount(labels, length=classes).astype(jnp.float32)
  p = counts[labels] / jnp.sum(counts[labels])

  def draw(state, key, shape):
    del state
    idx = jax.random.choice(key, n, shape, p=p).astype(jnp.int32)
    return rj.Sample(indices=idx, probs=p[idx], weights=1.0 / (n * p[idx]))

  return rj.Sampler(name="label-frequency", num_examples=n, batch_size=batch_size,
                    feature_names=(), init=lambda: (), draw=draw,
                    fold_in=lambda state, drawn, measured: state,
                    probabilities=lambda state: p)


def test_a_method_defined_outside_the_library_runs_on_both_drivers():
  """Methods are values: a toy sampler built in this file trains on the fast
  path and the per-step API, and its draws are unbiased."""
  data, model_fn, params, labels = problems.classification(120, 4)
  sampler = _label_frequency_sampler(labels, 4, 8)
  head = rj.softmax_cross_entropy_head()
  runner = rj.make_runner(model_fn, head, optax.sgd(0.1), sampler, block_size=4)
  state, metrics = runner.run(runner.init(params), jax.random.key(0), data, 30)
  assert int(state.step) == 30 and np.isfinite(np.asarray(metrics.loss)).all()
  step = jax.jit(rj.make_train_step(model_fn, head, optax.sgd(0.1), sampler))
  per_step = rj.init_train_state(params, optax.sgd(0.1), sampler)
  per_step, _ = step(per_step, jax.random.key(1), data)
  assert int(per_step.step) == 1
  # Unbiased, on gradients correlated with p, with a 1 % p-mismatch control.
  s = jax.vmap(lambda k: sampler.sample((), k))(jax.random.split(jax.random.key(2), 20000))
  assert_unbiased_with_power(s.indices, s.weights, sampler.probabilities(()))


def test_a_method_defined_outside_the_library_runs_through_compare(tmp_path):
  from rais_jax.experiments import compare  # pylint: disable=import-outside-toplevel
  config = compare.CompareConfig(epochs=1, num_samples=300, hidden=(8,), seeds=(0,),
                                 methods=("usgd", "toy"))
  toy = lambda labels, classes, cfg: (
      _label_frequency_sampler(labels, classes, cfg.batch_size), None)
  results = compare.run_compare(config, tmp_path, plots=False, quiet=True,
                                methods={"toy": toy})
  assert set(results["runs"]) == {"usgd", "toy"}
  assert results["runs"]["toy"]["0"]["steps"] > 0
  assert "toy" in results["summary"]["ranking"]["budget_matched_speedup_unbiased"]
