"""Selective-Backprop (rais_jax.baselines.selective_backprop): its rule on
hand-made problems, and on the fast path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import problems
import rais_jax as rj
from rais_jax.baselines import selective as sb

N, M, CLASSES = 240, 16, 4


@pytest.fixture(scope="module")
def problem():
  return problems.classification(N, CLASSES)


def _runner(problem, sampler, block_size=4):
  return problems.baseline_runner(problem[1], sampler, block_size)


# -- Selective-Backprop -------------------------------------------------------


def test_keep_probability_is_the_loss_percentile_to_the_beta():
  config = sb.Config(100, 4, beta=2.0, history_size=10)
  history = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 8, np.nan, np.nan], jnp.float32)
  losses = jnp.asarray([0.5, 2.0, 4.5, 8.0, 100.0, np.nan], jnp.float32)
  p = sb.keep_probabilities(config, history, losses)
  np.testing.assert_allclose(p, [0.0, (2 / 8) ** 2, (4 / 8) ** 2, 1.0, 1.0, 0.0])
  empty = jnp.full((10,), jnp.nan, jnp.float32)
  np.testing.assert_allclose(sb.keep_probabilities(config, empty, losses[:3]), 1.0)


def test_selection_frequencies_and_slots():
  """Over many draws each candidate is kept with frequency P_j (binomial
  tolerance), and the m slots hold the first kept candidates in order."""
  m = 8
  config = sb.Config(100, m, beta=1.0)
  assert config.candidates == 16
  rng = np.random.default_rng(0)
  history = jnp.asarray(rng.exponential(1.0, 1024), jnp.float32)
  losses = jnp.asarray(rng.exponential(1.0, 16), jnp.float32)
  p = np.asarray(sb.keep_probabilities(config, history, losses))
  uniforms = jax.random.uniform(jax.random.key(1), (20000, 16))
  slots, valid = jax.vmap(lambda u: sb.slots(config, history, losses, u))(uniforms)
  slots, valid = np.asarray(slots), np.asarray(valid)
  # From select's own output: candidate j < m is backpropagated exactly when
  # it is kept (fewer than m candidates come before it, so it is never cut),
  # so its frequency among the filled slots is P_j. 20000 Bernoulli draws per
  # candidate: 5 standard errors.
  chosen = np.zeros((len(slots), 16), bool)
  for row in range(len(slots)):
    chosen[row, slots[row][valid[row]]] = True
  freq = chosen[:, :m].mean(0)
  tol = 5 * np.sqrt(p[:m] * (1 - p[:m]) / 20000) + 1e-9
  assert np.all(np.abs(freq - p[:m]) <= tol)
  # It can fail: a rule that kept with P_j² (β doubled) is off by more.
  assert np.any(np.abs(freq - p[:m] ** 2) > tol)
  kept = np.asarray(uniforms) < p
  for row in range(50):
    first = np.flatnonzero(kept[row])[:m]
    assert valid[row].sum() == len(first)
    np.testing.assert_array_equal(slots[row][:len(first)], first)


def test_selective_backprop_on_the_fast_path(problem):
  data, _, params, _ = problem
  runner = _runner(problem, rj.baselines.selective_backprop(N, batch_size=M, beta=1.0,
                                                  history_size=64))
  state, metrics = runner.run(runner.init(params), jax.random.key(0), data, 40)
  sb = state.sampler
  assert int(sb.forwarded) == 40 * 32
  # At most m per step, and most slots filled (about m kept per step).
  assert 0.6 * 40 * M < int(sb.backpropagated) <= 40 * M
  assert np.all(np.isfinite(np.asarray(sb.history)))
  assert np.isfinite(np.asarray(metrics.loss)).all()
  ev = rj.evaluate(runner.programs.spec.model_fn, rj.softmax_cross_entropy_head(), state.params, data)
  ev0 = rj.evaluate(runner.programs.spec.model_fn, rj.softmax_cross_entropy_head(), params, data)
  assert float(ev["loss"]) < 0.5 * float(ev0["loss"])


def test_selective_backprop_survives_broken_examples(problem):
  """Candidates with a NaN loss are never kept (P = 0), counted, and do not
  void the steps whose empty slots they would have filled."""
  data, _, params, _ = problem
  data = dict(data, x=data["x"].at[:6].set(jnp.nan))
  runner = _runner(problem, rj.baselines.selective_backprop(N, batch_size=M, beta=3.0))
  state, metrics = runner.run(runner.init(params), jax.random.key(1), data, 40)
  assert int(state.sampler.nonfinite_losses) > 0
  assert int(state.skipped_steps) == 0
  assert np.isfinite(np.asarray(metrics.loss)).all()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_selective_backprop_refuses_a_loader(problem):
  """It forwards candidates drawn inside the step: it needs the data on device."""
  data, _, params, _ = problem
  runner = _runner(problem, rj.baselines.selective_backprop(N, batch_size=M))
  with pytest.raises(ValueError, match="not a loader"):
    runner.run(runner.init(params), jax.random.key(0),
               lambda idx: jax.tree.map(lambda x: x[idx], data), 4)
