"""InfoBatch (rais_jax.baselines.info_batch): its plans on hand-made
problems, and on the fast path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import problems
import rais_jax as rj
from rais_jax.baselines import info_batch as ib

N, M, CLASSES = 240, 16, 4


@pytest.fixture(scope="module")
def problem():
  return problems.classification(N, CLASSES)


def _runner(problem, sampler, block_size=4):
  return problems.baseline_runner(problem[1], sampler, block_size)


# -- InfoBatch ----------------------------------------------------------------


def _planned(scores, *, epoch=1, num_epochs=8, ratio=0.5, seeds=(0,), m=10):
  """InfoBatch's plans of one epoch for each seed (stacked along axis 0)."""
  config = ib.Config(len(scores), m, num_epochs, prune_ratio=ratio)
  state = ib.init(config).replace(
      scores=jnp.asarray(scores, jnp.float32), epoch=jnp.asarray(epoch, jnp.int32))
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  plans = jax.jit(jax.vmap(lambda k: ib.plan(config, state, k)))(keys)
  return jax.tree.map(np.asarray, plans)


def _head(plans, n):
  """(plans, n) bool: which examples each plan keeps (the head of its order)."""
  rank = np.argsort(plans.order, axis=1)  # position of each example
  return rank < plans.kept[:, None]


def test_infobatch_prunes_a_fraction_of_the_well_learned():
  """Of the W examples below the mean loss, exactly ⌊(1 − r) W⌋ are kept, with
  weight 1/(1 − r); the others are all kept with weight 1; the order starts
  with the kept ones; over many epochs each well-learned example is kept
  with frequency 1 − r."""
  rng = np.random.default_rng(0)
  scores = rng.exponential(1.0, 1000)
  well = scores < scores.mean()
  w = int(well.sum())
  plans = _planned(scores, ratio=0.3, seeds=range(200))
  head = _head(plans, 1000)
  kept = 1000 - w + int(np.floor(0.7 * w))
  np.testing.assert_array_equal(plans.kept, kept)
  assert head[:, ~well].all()
  np.testing.assert_allclose(plans.weights[head & well], 1 / 0.7, rtol=1e-6)
  np.testing.assert_allclose(plans.weights[~(head & well)], 1.0)
  np.testing.assert_array_equal(plans.epoch_steps, kept // 10)
  np.testing.assert_allclose(plans.schedule_advance, 100 / (kept // 10), rtol=1e-6)
  freq = head[:, well].mean(0)
  assert abs(freq.mean() - np.floor(0.7 * w) / w) < 1e-9  # exact count each epoch
  # Per example: binomial(200, 0.7), 5 standard errors.
  assert np.all(np.abs(freq - 0.7) < 5 * np.sqrt(0.21 / 200))


def test_infobatch_epoch_gradient_keeps_its_expectation():
  """E over the pruning of (1/n) Σ_{i kept} w_i g_i = (1/n) Σ_i g_i."""
  rng = np.random.default_rng(1)
  scores = rng.exponential(1.0, 300)
  grads = rng.normal(size=(300, 3))
  plans = _planned(scores, seeds=range(3000))
  est = ((_head(plans, 300) * plans.weights)[:, :, None] * grads).mean(1)
  mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(len(est))
  assert np.all(np.abs(mean - grads.mean(0)) < 4.5 * se), (mean, grads.mean(0), se)


def test_infobatch_first_and_annealed_epochs_use_all_data():
  scores = np.random.default_rng(2).exponential(1.0, 200)
  first = _planned(np.full(200, np.inf), epoch=0)  # nothing seen yet
  # E = 8, δ = 0.875: epochs 1..7 (⌊δ E⌋ = 7) prune, the 8th does not.
  seventh = _planned(scores, epoch=6)
  last = _planned(scores, epoch=7)
  for plans in (first, last):
    np.testing.assert_array_equal(plans.kept, 200)
    np.testing.assert_array_equal(plans.epoch_steps, 20)
    np.testing.assert_allclose(plans.weights, 1.0)
    np.testing.assert_array_equal(plans.schedule_advance, 1.0)
  assert seventh.kept[0] < 200


def test_infobatch_epochs_on_the_fast_path(problem):
  """Each epoch visits its kept examples once (their scores are updated),
  the schedule advances by one data epoch per epoch, and a block size that
  does not divide the epoch gives the run that K = 1 gives."""
  data, _, params, _ = problem
  results = {}
  for k in (1, 4):
    runner = _runner(problem, rj.baselines.infobatch(N, batch_size=M, num_epochs=6), block_size=k)
    state, key, lengths = runner.init(params), jax.random.key(3), []
    for epoch in range(4):
      before = np.asarray(state.sampler.scores)
      state, _ = runner.run_epoch(state, key, data)
      ib = state.sampler
      lengths.append(int(ib.epoch_steps))
      visited = np.asarray(ib.order)[:int(ib.epoch_steps) * M]
      assert len(np.unique(visited)) == len(visited)  # without replacement
      changed = np.flatnonzero(np.asarray(ib.scores) != before)
      assert set(changed) <= set(visited)
      np.testing.assert_allclose(float(rj.equivalent_iterations(state.opt_state)),
                                 (epoch + 1) * (N // M), rtol=1e-5)
    assert int(ib.pruned) > 0
    results[k] = (state.params, lengths)
  assert results[1][1] == results[4][1]
  assert any(n % 4 for n in lengths), lengths  # partial blocks ran
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               results[1][0], results[4][0])


def test_bad_arguments():
  for kwargs, message in [(dict(beta=0.0), "beta must be"),
                          (dict(history_size=0), "history_size")]:
    with pytest.raises(ValueError, match=message):
      rj.baselines.selective_backprop(10, batch_size=2, **kwargs)
  for kwargs, message in [(dict(num_epochs=0), "num_epochs"),
                          (dict(num_epochs=2, prune_ratio=1.0), "prune_ratio"),
                          (dict(num_epochs=2, anneal=1.5), "anneal")]:
    with pytest.raises(ValueError, match=message):
      rj.baselines.infobatch(10, batch_size=2, **kwargs)
