"""The fast path (rais_jax.runner): a branch-free step, block sampling, (PT)
handed off between blocks, faults and checkpoints."""

import functools
import re

import jax
from jax._src import array as jax_array  # ArrayImpl: to count host reads
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hlo as hlo_lib
import problems
import rais_jax as rj
from rais_jax.schedule import Schedule
from rais_jax import step as step_lib
from rais_jax import checkpoint
from rais_jax.pt import solver as pt_solver
from stats_helpers import assert_unbiased_with_power, pool, pooled_chisquare_pvalue
from scipy import stats

N, M, CLASSES, K = 240, 16, 4, 4


@pytest.fixture(scope="module")
def problem():
  return problems.classification(N, CLASSES)


def _sampler(method, labels, mode="async", pt_delay=None):
  return problems.sampler(method, labels, CLASSES, M, buffer_size=128, mode=mode,
                          pt_delay=pt_delay)


def _runner(problem, method="rais", *, mode="async", norms="proxy", block_size=K,
            pt_delay=None):
  _, model_fn, _, labels = problem
  return rj.make_runner(
      model_fn, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.05, momentum=0.9),
      _sampler(method, labels, mode, pt_delay), norms=None if method == "usgd" else norms,
      block_size=block_size, oracle_period=8)


def _run(problem, steps, **kwargs):
  data, _, params, _ = problem
  runner = _runner(problem, **kwargs)
  with runner:
    state, metrics = runner.run(runner.init(params), jax.random.key(42), data, steps)
  return state, metrics, runner


# -- the compiled step ------------------------------------------------------


@pytest.mark.parametrize("method, norms, function", [
    ("rais", "exact", "steps"), ("rais", "proxy", "steps"), ("usgd", None, "steps"),
    ("rais", "exact", "block"), ("osgd", "exact", "block")])
def test_step_loop_has_no_branch_loop_or_callback(problem, method, norms, function):
  """The per-step loop body (the scan outside any conditional) compiles to
  straight-line code: no conditional, no nested while, no host callback; in
  what ``run`` calls (``steps``) and in the all-in-one ``block``."""
  data, _, params, _ = problem
  runner = _runner(problem, method, norms=norms)
  state = runner.init(params)
  hlo = jax.jit(getattr(runner.programs, function)).lower(
      state, jax.random.key(0), data).compile().as_text()
  comps, entry = hlo_lib.computations(hlo), hlo_lib.entry(hlo)
  # Top-level loops: the step scan, and the sampler's random-number loops.
  steps = [text for text in hlo_lib.top_level_loops(hlo)
           if re.search(r" dot\(|__ynn_fusion", text)]
  assert len(steps) == 1, f"{len(steps)} top-level loops compute a gradient"
  text = steps[0]
  assert " conditional(" not in text, "a conditional in the step loop"
  assert " while(" not in text, "a nested loop in the step loop"
  calls = re.findall(r'custom_call_target="([^"]+)"', text)
  assert not [c for c in calls if "callback" in c.lower()], calls
  # The check can fail: the guarded re-run's loop is inside a conditional.
  assert " conditional(" in comps[entry]


@pytest.mark.parametrize("norms", ["exact", "proxy"])
def test_grad_sq_norm_is_measured_once_per_block_with_exact_norms(problem, norms):
  """Exact norms: ‖g_R‖² enters the gain ratio once per block (the first
  step: the loop body leaves that pass over the gradient out), its average
  at the rate for one measurement per block; Û and R̂ every step. Proxy
  norms need it on every step. ``StepMetrics.grad_sq_norm`` is NaN where it
  was not computed."""
  blocks = 6
  state, metrics, runner = _run(problem, blocks * K, norms=norms)
  alpha, moments = runner.sampler.ema_rate, state.moments
  assert int(moments.count) == blocks * K
  np.testing.assert_allclose(moments.weight, 1 - (1 - alpha) ** (blocks * K),
                             rtol=1e-5)
  g2 = np.asarray(metrics.grad_sq_norm).reshape(blocks, K)
  if norms == "exact":
    rate = step_lib.grad_rate(runner.sampler.ema_rate, K)
    assert alpha < rate < 1 - (1 - alpha) ** K
    np.testing.assert_allclose(moments.grad_weight, 1 - (1 - rate) ** blocks,
                               rtol=1e-5)
    assert np.isfinite(g2[:, 0]).all() and np.isnan(g2[:, 1:]).all()
  else:
    np.testing.assert_allclose(moments.grad_weight, moments.weight, rtol=1e-6)
    assert np.isfinite(g2).all()


# -- block sampling ---------------------------------------------------------


def _fitted_state(n=1000, num_classes=4, seed=0, floor=0.05):
  sampler, state, *_ = problems.fitted_sampler(n, 64, floor, seed, num_classes)
  return sampler, state


def test_block_draws_match_probabilities_chi_square():
  """K·m = 32·64 draws per block from n = 1000 (duplicates in every block):
  frequencies against p, and each draw reports its own p and weight."""
  sampler, state = _fitted_state()
  draw = jax.jit(lambda k: sampler.draw(state, k, (32, 64)))
  samples = [draw(k) for k in jax.random.split(jax.random.key(0), 64)]
  idx = np.concatenate([np.asarray(s.indices).ravel() for s in samples])
  probs = np.concatenate([np.asarray(s.probs).ravel() for s in samples])
  weights = np.concatenate([np.asarray(s.weights).ravel() for s in samples])
  block = np.asarray(samples[0].indices).ravel()
  assert len(block) - len(np.unique(block)) > 100  # duplicates within a block
  p = np.asarray(sampler.probabilities(state), np.float64)
  np.testing.assert_allclose(probs, p[idx], rtol=1e-5)
  np.testing.assert_allclose(weights, 1 / (1000 * p[idx]), rtol=1e-4)
  counts = np.bincount(idx, minlength=1000)
  # p-value uniform under a correct sampler; 1e-3 fails one seed in 1000.
  assert pooled_chisquare_pvalue(counts, p * idx.size) > 1e-3


def test_block_and_per_step_draws_agree_in_distribution():
  """The fast path's (K, m) draws and make_train_step's per-step (m,) draws
  come from one distribution (two-sample chi-square)."""
  sampler, state = _fitted_state(seed=3)
  per_step = jax.jit(jax.vmap(lambda k: sampler.sample(state, k)))(
      jax.random.split(jax.random.key(1), 2048)).indices
  block = jax.jit(jax.vmap(lambda k: sampler.draw(state, k, (32, 64))))(
      jax.random.split(jax.random.key(2), 64)).indices
  a = np.bincount(np.asarray(per_step).ravel(), minlength=1000)
  b = np.bincount(np.asarray(block).ravel(), minlength=1000)
  assert a.sum() == b.sum()
  table = np.stack(pool((a + b) >= 10, a, b))
  assert stats.chi2_contingency(table).pvalue > 1e-3


def test_block_importance_weighted_gradient_is_unbiased():
  """mean over blocks of (1/m) Σ_k w_k g_k equals (1/n) Σ_i g_i, per step of
  the block (each weight uses the p its index was drawn from), on gradients
  correlated with p. 8 steps of one block share nothing but p, so the 32000
  estimates are i.i.d. Power, measured at this seed: weights from a p 1 %
  too high on half the examples give |z| ≈ 42, 0.2 % too high |z| ≈ 9
  (the 1 % control is asserted > 4.5)."""
  sampler, state = _fitted_state(n=200, seed=5, floor=0.1)
  s = jax.jit(jax.vmap(lambda key: sampler.draw(state, key, (8, 64))))(
      jax.random.split(jax.random.key(7), 4000))
  assert_unbiased_with_power(s.indices, s.weights, sampler.probabilities(state))


def test_fold_in_matches_per_step_updates_without_duplicates():
  """Folding a block in at once gives the features, D and trees that m-sized
  updates one after the other give, when no index repeats."""
  sampler, state = _fitted_state(n=300, seed=2)
  rng = np.random.default_rng(0)
  idx = jnp.asarray(rng.permutation(300)[:4 * 64].reshape(4, 64), jnp.int32)
  p = sampler.probabilities(state)[idx]
  sample = rj.Sample(indices=idx, probs=p, weights=1 / (300 * p))
  norms = jnp.asarray(rng.lognormal(0, 1, (4, 64)), jnp.float32)
  norms = norms.at[1, 3].set(jnp.nan)
  fold_in = jax.jit(sampler.fold_in)  # not op by op
  block = fold_in(state, sample, norms)
  steps = state
  for t in range(4):
    steps = fold_in(steps, jax.tree.map(lambda x: x[t], sample), norms[t])
  for a, b in [(block.features, steps.features), (block.records, steps.records),
               (block.totals, steps.totals), (block.diagnostics, steps.diagnostics)]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5), a, b)
  np.testing.assert_allclose(block.trees.nodes, steps.trees.nodes, rtol=1e-5)
  assert int(block.diagnostics.nonfinite_norms) == 1


# -- training, (PT) hand-off ------------------------------------------------


@pytest.mark.parametrize("method", ["usgd", "rais", "osgd", "naive", "loss-is"])
def test_methods_train(problem, method):
  data, model_fn, params, _ = problem
  state, metrics, runner = _run(problem, 160, method=method)
  head = rj.softmax_cross_entropy_head()
  before = rj.evaluate(model_fn, head, params, data)
  after = rj.evaluate(model_fn, head, state.params, data)
  assert float(after["loss"]) < 0.5 * float(before["loss"])
  assert metrics.loss.shape == (160,)
  assert np.all(np.isfinite(np.asarray(metrics.loss)))
  r = np.asarray(metrics.gain_ratio)
  assert np.all((r >= 1) & (r <= M))
  assert int(state.step) == 160 and int(state.skipped_steps) == 0
  if method in ("usgd", "loss-is"):
    assert np.all(r == 1)
  if method in ("naive", "loss-is"):  # every example drawn has its last value
    seen = np.asarray(state.sampler.features) >= 0
    assert 0.9 * N < seen.sum() and np.all(np.isfinite(state.sampler.features))
  if method == "rais":
    assert runner.pt_period == 8 and runner.pt_delay == 8  # the default: one period
    assert int(state.sampler.diagnostics.pt_solves) >= 15
    assert int(state.sampler.diagnostics.pt_failures) == 0


@pytest.mark.parametrize("method", ["usgd", "rais", "naive", "loss-is"])
def test_a_loader_gives_the_run_that_device_data_gives(problem, method):
  """Your own data: the host loader fetches each block's (K, m) indices (here
  from NumPy arrays) and the run equals the one that gathers on device."""
  data, _, params, _ = problem
  host = jax.tree.map(np.asarray, data)
  calls = []

  def loader(indices):
    calls.append(indices.shape)
    return jax.tree.map(lambda x: x[indices], host)

  a, ma, _ = _run(problem, 32, method=method, norms="exact")
  runner = _runner(problem, method, norms="exact")
  with runner:
    b, mb = runner.run(runner.init(params), jax.random.key(42), loader, 32)
  assert calls == [(K, M)] * (32 // K)
  if method == "rais":
    assert int(b.sampler.diagnostics.pt_solves) >= 2
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               (a.params, ma.loss), (b.params, mb.loss))


def test_loader_errors(problem):
  data, _, params, _ = problem
  loader = lambda idx: jax.tree.map(lambda x: np.asarray(x)[idx], data)
  runner = _runner(problem, "osgd")
  with pytest.raises(ValueError, match="'oracle' .* not a loader"):
    runner.run(runner.init(params), jax.random.key(0), loader, K)
  runner = _runner(problem, "usgd")
  state = runner.init(params)
  drawn = runner.programs.draw(state, jax.random.key(0))
  with pytest.raises(ValueError, match="leading axes"):
    runner.programs.fed_steps(state, drawn, jax.tree.map(lambda x: x[:K * M], data))


@pytest.mark.parametrize("norms", ["proxy", "exact"])
def test_async_sync_and_in_graph_runs_are_identical(problem, norms):
  """Host solves with and without waiting: bit-identical states and metrics
  on every backend (both solve on the host's CPU device). In-graph solves (one
  scanned program over blocks) run on the default device: the same run on the
  CPU; elsewhere their (c, d) round differently, so the runs part ways after
  the first delivery."""
  data, _, params, _ = problem
  a, ma, _ = _run(problem, 96, mode="async", norms=norms)
  s, ms, _ = _run(problem, 96, mode="sync", norms=norms)
  assert int(a.sampler.diagnostics.pt_solves) >= 9
  jax.tree.map(np.testing.assert_array_equal, (a, ma), (s, ms))
  runner = _runner(problem, mode="sync", norms=norms)
  key = jax.random.key(42)
  graph = jax.jit(lambda st: jax.lax.scan(
      lambda c, b: runner.programs.block(c, jax.random.fold_in(key, b * K), data), st,
      jnp.arange(96 // K)))
  g, mg = graph(runner.init(params))
  mg = jax.tree.map(lambda x: x.reshape(-1), mg)
  if jax.default_backend() == "cpu":
    jax.tree.map(np.testing.assert_array_equal, (g, mg), (s, ms))
  else:
    # (The two programs fuse differently, so even before the first delivery
    # they may round apart; the first block agrees to float tolerance.)
    np.testing.assert_allclose(mg.loss[:K], ms.loss[:K], rtol=1e-5)
    assert int(g.sampler.diagnostics.pt_solves) == int(s.sampler.diagnostics.pt_solves)


def _count_solves(runner) -> list:
  """Wraps the runner's solve service so that each solve it starts is listed."""
  calls, solve = [], runner.service._solve  # pylint: disable=protected-access
  runner.service._solve = lambda *a: calls.append(1) or solve(*a)  # pylint: disable=protected-access
  return calls


def test_make_runner_builds_the_schedule_of_its_sampler(problem):
  """The breaks come from the sampler's facts: (PT) snapshots and deliveries
  (its period and delay in whole blocks), the oracle's refreshes, none for
  U-SGD (tests/test_schedule.py checks the programs each issues)."""
  epoch = N // M
  assert _runner(problem).schedule == Schedule(K, 8, (0,), epoch)  # period 8, delay 8
  assert _runner(problem, pt_delay=4).schedule == Schedule(K, 8, (0, 4), epoch)
  assert _runner(problem, "usgd").schedule == Schedule(K, K, (), epoch)
  assert _runner(problem, "osgd").schedule == Schedule(K, 8, (0,), epoch)
  assert _runner(problem, block_size=3).schedule == Schedule(3, 9, (0,), epoch)


@pytest.mark.parametrize("method", ["usgd", "rais"])
def test_warm_up_compiles_what_epochs_run(problem, method):
  """After warm_up, epoch after epoch compiles nothing more (RAIS: K = 3,
  period 9, epochs of 15 steps start at every third step of a period)."""
  data, _, params, _ = problem
  runner = _runner(problem, method, block_size=3)
  runner.warm_up(params, data)
  programs = ("blocks", "concat", "deliver", "snapshot", "deliver_and_snapshot",
              "header")
  sizes = [getattr(runner.compiled, p)._cache_size() for p in programs]
  state = runner.init(params)
  with runner:
    for epoch in range(3):  # epochs start at steps 0, 6 and 3 of the period
      state, _ = runner.run_epoch(state, jax.random.key(epoch), data)
  assert [getattr(runner.compiled, p)._cache_size() for p in programs] == sizes


def test_a_solve_due_off_the_boundaries_is_applied(problem):
  """A state whose solve is due where this runner has no boundary (taken
  with another pt_delay, e.g. a checkpoint) still gets it applied."""
  data, _, params, _ = problem
  with _runner(problem, pt_delay=4) as first:  # period 8: the snapshot at 8 is due at 12
    state, _ = first.run(first.init(params), jax.random.key(0), data, 8)
  assert int(state.sampler.pending.due) == 12
  solves = int(state.sampler.diagnostics.pt_solves)
  with _runner(problem) as second:  # delay 8: boundaries at 0 mod 8 only
    state, _ = second.run(state, jax.random.key(0), data, 16)
  # Applied at 12 (the first runner's) and at 24 (the snapshot taken at 16).
  assert int(state.sampler.diagnostics.pt_solves) == solves + 2


def test_calls_in_pieces_equal_one_call(problem):
  """Also: each snapshot is solved once, including one taken at the very end
  of a call (handed to the service before the call returns) and one in
  flight across calls."""
  data, _, params, _ = problem
  runner = _runner(problem)
  whole_solves = _count_solves(runner)
  with runner:
    whole, mw = runner.run(runner.init(params), jax.random.key(42), data, 64)
  runner = _runner(problem)
  piece_solves = _count_solves(runner)
  state = runner.init(params)
  parts = []
  # Ends mid-period with a solve in flight (12), then at a period boundary
  # (32: the snapshot taken after the last block), then the rest.
  for steps in (12, 20, 32):
    state, m = runner.run(state, jax.random.key(42), data, steps)
    parts.append(m)
  runner.close()
  jax.tree.map(np.testing.assert_array_equal, whole, state)
  jax.tree.map(lambda x, *y: np.testing.assert_array_equal(x, np.concatenate(y)),
               mw, *parts)
  assert len(piece_solves) == len(whole_solves) >= 6


@pytest.mark.parametrize("method", ["usgd", "rais"])
def test_a_continuing_run_reads_the_device_once(problem, method, monkeypatch):
  """A run from the state the last one returned reads the device once (at
  its end: the skipped steps, with RAIS's last snapshot, in one
  ``device_get``) and nothing else: each host read cost ~1 ms of wall-clock
  on the CPU."""
  data, _, params, _ = problem
  runner = _runner(problem, method)  # RAIS: a snapshot after every 8 steps
  gets, elsewhere, inside = [], [], [False]
  device_get, value = jax.device_get, jax_array.ArrayImpl._value

  def counted_get(x):
    gets.append(1)
    inside[0] = True
    try:
      return device_get(x)
    finally:
      inside[0] = False

  def watched_value(self):  # every host read of an array goes through here
    if not inside[0]:
      elsewhere.append(self.shape)
    return value.fget(self)

  with runner:
    state, _ = runner.run(runner.init(params), jax.random.key(0), data, 8)
    monkeypatch.setattr(jax, "device_get", counted_get)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(watched_value))
    for _ in range(3):
      state, _ = runner.run(state, jax.random.key(0), data, 8)
    assert len(gets) == 3 and not elsewhere
    # Positive control: a host read outside device_get is seen. (Only reads
    # through ArrayImpl._value are: int(), float(), .tolist(); on the CPU
    # np.asarray and .item() read the buffer without it, measured on jax
    # 0.10.2, and jax.transfer_guard does not apply to CPU arrays.)
    int(state.step)
  assert elsewhere == [()]


def test_a_closed_runner_or_a_copied_state_continues_the_run(problem):
  """The host's memory of the state a run returned never stands in for
  another state: after close() (the solve in flight dropped) and from a
  copy of the state, the run continues bit-identically."""
  data, _, params, _ = problem
  full, _, _ = _run(problem, 32)
  runner = _runner(problem)
  solves = _count_solves(runner)
  state, _ = runner.run(runner.init(params), jax.random.key(42), data, 16)
  runner.close()  # the solve due at 24 is dropped: solved again
  state, _ = runner.run(state, jax.random.key(42), data, 8)
  state, _ = runner.run(jax.tree.map(jnp.copy, state), jax.random.key(42), data, 8)
  runner.close()
  jax.tree.map(np.testing.assert_array_equal, state, full)
  assert int(state.sampler.diagnostics.pt_solves) == 3  # due at 16, 24, 32
  assert len(solves) == 5  # taken at 8, 16 (again after close()), 24, 32


def test_checkpoint_resume_mid_solve_is_bit_identical(problem, tmp_path):
  """Saved at a block boundary while a solve is in flight, restored into a
  new runner (whose service never saw it): the run continues bit-identically."""
  data, _, params, labels = problem
  full, _, _ = _run(problem, 48)
  half, _, _ = _run(problem, 24)  # (PT) period 8, delay 8: submitted at 24
  assert int(half.sampler.pending.due) == 32
  sampler = _sampler("rais", labels)
  checkpoint.save(tmp_path / "ckpt", half, sampler)
  fresh = _runner(problem)
  restored = checkpoint.restore(tmp_path / "ckpt", fresh.init(params), sampler)
  jax.tree.map(np.testing.assert_array_equal, restored, half)
  with fresh:
    resumed, _ = fresh.run(restored, jax.random.key(42), data, 24)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_run_validates_its_arguments(problem):
  data, _, params, _ = problem
  runner = _runner(problem)
  with pytest.raises(ValueError, match="multiple of the block size"):
    runner.run(runner.init(params), jax.random.key(0), data, 6)
  with pytest.raises(ValueError, match="n = 240"):
    runner.run(runner.init(params), jax.random.key(0),
               jax.tree.map(lambda x: x[:100], data), 4)
  with pytest.raises(ValueError, match="block_size"):
    _runner(problem, block_size=0)
  with pytest.warns(UserWarning, match="half the"):
    _runner(problem, block_size=2 * K)  # the (PT) period is 8 steps
  odd = rj.rais_sampler(rj.default_features(problem[3], CLASSES), batch_size=5)
  make = functools.partial(rj.make_runner, problem[1], rj.softmax_cross_entropy_head())
  with pytest.raises(ValueError, match="even"):
    make(rj.rais_sgd(0.1), odd, norms="proxy", block_size=4)
  with pytest.raises(ValueError, match="norms=None with a 'rais' sampler"):
    make(rj.rais_sgd(0.1), odd, norms=None, block_size=4)


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1, momentum=0.9), optax.adam(1e-3),
                                       optax.scale(-0.1)])  # the last: no extra args
def test_an_optimizer_that_ignores_the_gain_ratio_is_refused(problem, optimizer):
  """A stock optax optimizer would silently train RAIS at the plain rate."""
  data, model_fn, params, labels = problem
  rais = rj.rais_sampler(rj.default_features(labels, CLASSES), batch_size=M)
  runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(), optimizer, rais,
                          block_size=K)
  with pytest.raises(ValueError, match="ignores the gain_ratio.*scale_by_gain_ratio"):
    runner.run(runner.init(params), jax.random.key(0), data, K)
  # U-SGD takes any optimizer: its gain ratio is 1.
  usgd = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(), optimizer,
                        rj.uniform_sampler(N, batch_size=M), block_size=K)
  usgd.run(usgd.init(params), jax.random.key(0), data, K)


# -- faults -----------------------------------------------------------------


@pytest.mark.parametrize("mode, failure", [("sync", "nan"), ("async", "raise")])
def test_failed_solves_keep_the_previous_parameters(problem, monkeypatch, mode,
                                                    failure):
  """A solve that raises (on the service's thread) or returns NaN is counted
  and leaves (c, d) and the sampling distribution as they were."""
  monkeypatch.setattr(pt_solver, "solve_pt", problems.broken_solver(failure))
  state, metrics, _ = _run(problem, 48, mode=mode)
  diag = state.sampler.diagnostics
  assert int(diag.pt_failures) >= 4 and int(diag.pt_solves) == 0
  assert not bool(state.sampler.fitted)
  np.testing.assert_array_equal(state.sampler.c, 0.0)
  assert np.all(np.isfinite(np.asarray(metrics.loss)))


@pytest.mark.parametrize("method, norms", [("usgd", None), ("rais", "proxy"),
                                           ("rais", "exact")])
def test_all_nan_data_changes_nothing(problem, method, norms):
  data, _, params, _ = problem
  bad = {**data, "x": jnp.full_like(data["x"], jnp.nan)}
  runner = _runner(problem, method, norms=norms)
  state0 = runner.init(params)
  opt0 = jax.tree.map(np.asarray, state0.opt_state)
  with pytest.warns(RuntimeWarning, match="every one of the 8 steps was skipped"):
    state, metrics = runner.run(state0, jax.random.key(0), bad, 8)
  runner.close()
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt0)
  assert int(state.skipped_steps) == 8 and not np.any(np.asarray(metrics.applied))
  if method == "rais":
    assert int(state.sampler.diagnostics.nonfinite_norms) == 8 * M


@pytest.mark.parametrize("norms", ["proxy", "exact"])
def test_nan_examples_skip_exactly_their_steps(problem, norms):
  """3 of 240 examples NaN: the block re-runs guarded, skipping exactly the
  steps that drew one; everything stays finite and the clean loss falls."""
  data, model_fn, params, _ = problem
  x = np.asarray(data["x"]).copy()
  x[[5, 77, 150]] = np.nan
  bad = {**data, "x": jnp.asarray(x)}
  runner = _runner(problem, norms=norms)
  with pytest.warns(RuntimeWarning, match=r"\d+ of the 160 steps were skipped"):
    state, metrics = runner.run(runner.init(params), jax.random.key(3), bad, 160)
  runner.close()
  finite_loss = np.isfinite(np.asarray(metrics.loss))
  np.testing.assert_array_equal(np.asarray(metrics.applied), finite_loss)
  skipped = int(state.skipped_steps)
  assert skipped == int((~finite_loss).sum()) and 5 <= skipped <= 100
  assert int(state.sampler.diagnostics.nonfinite_norms) >= skipped
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(
      (state.params, state.opt_state, state.moments, state.sampler.trees)))
  keep = np.ones(N, bool)
  keep[[5, 77, 150]] = False
  clean = jax.tree.map(lambda v: v[keep], data)
  head = rj.softmax_cross_entropy_head()
  assert (float(rj.evaluate(model_fn, head, state.params, clean)["loss"])
          < 0.5 * float(rj.evaluate(model_fn, head, params, clean)["loss"]))


def test_nonfinite_gradient_behind_a_finite_loss_is_skipped(problem):
  """U-SGD's fast scan checks only the loss per step; a NaN gradient with a
  finite loss (√ at 0) is caught by the block's final check and skipped."""
  data, model_fn, params, _ = problem
  z = np.ones(N, np.float32)
  z[[3, 99]] = 0.0  # d√(z s)/ds = z / (2√(z s)) = 0/0 for these examples
  data = {**data, "z": jnp.asarray(z)}
  params = {"mlp": params, "s": jnp.ones((), jnp.float32)}
  model = lambda p, b: model_fn(p["mlp"], b) + jnp.sqrt(b["z"] * p["s"])[:, None]
  runner = rj.make_runner(model, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.05),
                          rj.uniform_sampler(N, batch_size=M), norms=None,
                          block_size=K)
  with pytest.warns(RuntimeWarning, match="steps were skipped"):
    state, metrics = runner.run(runner.init(params), jax.random.key(1), data, 80)
  assert np.all(np.isfinite(np.asarray(metrics.loss)))
  skipped = int(state.skipped_steps)
  assert skipped == int((~np.asarray(metrics.applied)).sum()) and 2 <= skipped <= 30
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(
      (state.params, state.opt_state)))


def test_out_of_range_labels_are_skipped_with_a_warning_and_counted(problem):
  """Labels outside [0, C), also negative ones (which optax's loss would wrap
  onto a class), give NaN losses: their steps are skipped with a warning,
  and evaluate counts them."""
  data, model_fn, params, _ = problem
  labels = np.asarray(data["label"]).copy()
  labels[[4, 100]] = [CLASSES, -1]
  bad = {**data, "label": jnp.asarray(labels)}
  runner = _runner(problem, norms="exact")
  with pytest.warns(RuntimeWarning, match="labels outside the model's classes"):
    state, metrics = runner.run(runner.init(params), jax.random.key(3), bad, 64)
  runner.close()
  assert int(state.skipped_steps) == int((~np.asarray(metrics.applied)).sum()) >= 1
  result = rj.evaluate(model_fn, rj.softmax_cross_entropy_head(), params, bad)
  assert int(result["nonfinite"]) == 2 and np.isnan(float(result["loss"]))


def test_auto_exact_method_is_measured_once_and_used(problem):
  """exact_method="auto" measures once per runner (every block program uses
  the same choice) and trains exactly as the method it chose, named."""
  data, model_fn, params, labels = problem
  make = lambda method: rj.make_runner(
      model_fn, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.05, momentum=0.9),
      _sampler("rais", labels, "sync"), norms="exact", exact_method=method,
      block_size=K)
  auto = make("auto")
  with auto:  # (PT) solves between blocks: two more programs to trace
    a, _ = auto.run(auto.init(params), jax.random.key(5), data, 32)
  (chosen,) = auto.chosen_methods.values()
  assert chosen in ("ghost", "vmap")
  with make(chosen) as named:
    b, _ = named.run(named.init(params), jax.random.key(5), data, 32)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


# -- claims of the user guide -----------------------------------------------


def test_pt_device_is_where_solves_run(problem):
  data, _, params, labels = problem
  device = jax.local_devices(backend="cpu")[-1]
  runner = rj.make_runner(problem[1], rj.softmax_cross_entropy_head(),
                          rj.rais_sgd(0.05), _sampler("rais", labels), norms="exact",
                          block_size=K, pt_device=device)
  assert runner.service.device == device
  with runner:
    state, _ = runner.run(runner.init(params), jax.random.key(0), data, 32)
  assert int(state.sampler.diagnostics.pt_solves) >= 2


def test_blocks_longer_than_half_the_period_are_warned_of(problem):
  with pytest.warns(UserWarning, match="more than half the"):
    _runner(problem, block_size=6)  # (PT) period 8


def test_run_donates_the_state_it_is_given(problem):
  """``run`` reuses the given state's buffers: continue from the returned one."""
  data, _, params, _ = problem
  runner = _runner(problem, "usgd")
  state = runner.init(params)
  new, _ = runner.run(state, jax.random.key(0), data, K)
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
  assert not any(x.is_deleted() for x in jax.tree.leaves(new.params))
