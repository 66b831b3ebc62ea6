import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import problems
import rais_jax as rj

N, M, CLASSES = 240, 16, 4


@pytest.fixture(scope="module")
def problem():
  return problems.classification(N, CLASSES)


def _sampler(method, labels, mode="async"):
  return problems.sampler(method, labels, CLASSES, M, buffer_size=96, mode=mode)


def _run(problem, method, steps, *, mode="async", state=None, start=0, norms="proxy",
         exact_method="ghost"):
  data, model_fn, params, labels = problem
  sampler = _sampler(method, labels, mode)
  opt = rj.rais_sgd(0.05, momentum=0.9)
  step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt, sampler,
                            norms=None if method == "usgd" else norms,
                            oracle_period=4, exact_method=exact_method)
  if state is None:
    state = rj.init_train_state(params, opt, sampler)
  keys = jax.random.split(jax.random.key(42), 10_000)[start:start + steps]
  run = jax.jit(lambda s, k, d: jax.lax.scan(lambda c, kk: step(c, kk, d), s, k))
  state, metrics = run(state, keys, data)
  return state, metrics, model_fn


@pytest.mark.parametrize("method", ["usgd", "rais", "osgd"])
def test_methods_train(problem, method):
  data = problem[0]
  state, metrics, model_fn = _run(problem, method, 150)
  head = rj.softmax_cross_entropy_head()
  before = rj.evaluate(model_fn, head, problem[2], data)
  after = rj.evaluate(model_fn, head, state.params, data)
  assert float(after["loss"]) < 0.5 * float(before["loss"])
  assert np.all(np.isfinite(np.asarray(metrics.loss)))
  r = np.asarray(metrics.gain_ratio)
  assert np.all((r >= 1) & (r <= M))
  if method == "usgd":
    assert np.all(r == 1)
  if method == "rais":
    assert int(state.sampler.diagnostics.pt_solves) >= 10


def test_exact_norms_step(problem):
  state, metrics, _ = _run(problem, "rais", 40, norms="exact")
  assert int(state.sampler.diagnostics.pt_solves) >= 2
  assert np.all(np.isfinite(np.asarray(metrics.loss)))


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("method", ["rais", "osgd"])
def test_ghost_step_matches_vmap_step(problem, method):
  """Same step with ghost and with vmap norms: the gradient, the norms
  written into the sampler (RAIS) and the oracle's norms (O-SGD) agree."""
  ghost, _, _ = _run(problem, method, 1, norms="exact")
  ref, _, _ = _run(problem, method, 1, norms="exact", exact_method="vmap")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               (ghost.params, ghost.sampler.features, ghost.sampler.trees),
               (ref.params, ref.sampler.features, ref.sampler.trees))


def test_async_and_sync_runs_are_identical(problem):
  """Bit-identical on the CPU. The per-step path solves an asynchronous (PT)
  on the host's CPU device (a callback) and a synchronous one in-graph, on the
  default device: on an accelerator the two (c, d) round apart, so there the
  runs agree until the first delivery (the fast path, make_runner, solves
  both on the CPU device: bit-identical everywhere, tests/test_runner.py)."""
  a, ma, _ = _run(problem, "rais", 60, mode="async")
  s, ms, _ = _run(problem, "rais", 60, mode="sync")
  assert int(a.sampler.diagnostics.pt_solves) >= 5
  assert int(a.sampler.diagnostics.pt_solves) == int(s.sampler.diagnostics.pt_solves)
  if jax.default_backend() == "cpu":
    jax.tree.map(np.testing.assert_array_equal, a, s)
    jax.tree.map(np.testing.assert_array_equal, ma, ms)
  else:  # D fills after a period; its solve is applied after the delay
    pt = _sampler("rais", problem[3]).pt
    first = pt.period + pt.delay
    np.testing.assert_allclose(ma.loss[:first], ms.loss[:first], rtol=1e-5)


def test_orbax_resume_is_bit_identical(problem, tmp_path):
  full, _, _ = _run(problem, "rais", 50)
  # 25 steps leaves a (PT) solve in flight (submitted at 24, due at 30).
  half, _, _ = _run(problem, "rais", 25)
  assert int(half.sampler.pending.due) == 30
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, half)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, half))
  jax.tree.map(np.testing.assert_array_equal, restored, half)
  resumed, _, _ = _run(problem, "rais", 25, state=restored, start=25)
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_refuses_what_would_silently_give_no_boost(problem):
  data, model_fn, params, labels = problem
  make = lambda opt, sampler, **kw: rj.make_train_step(
      model_fn, rj.softmax_cross_entropy_head(), opt, sampler, **kw)
  odd = rj.rais_sampler(rj.default_features(labels, CLASSES), batch_size=5)
  with pytest.raises(ValueError, match="even"):
    make(rj.rais_sgd(0.1), odd, norms="proxy")
  with pytest.raises(ValueError, match="norms=None with a 'oracle' sampler"):
    make(rj.rais_sgd(0.1), _sampler("osgd", labels), norms=None)
  sampler = _sampler("rais", labels)
  step = make(optax.adam(1e-3), sampler)
  with pytest.raises(ValueError, match="ignores the gain_ratio.*scale_by_gain_ratio"):
    step(rj.init_train_state(params, optax.adam(1e-3), sampler), jax.random.key(0), data)


def test_state_is_donatable(problem):
  """No two leaves of a fresh state share a buffer, so it can be donated."""
  data, model_fn, params, labels = problem
  sampler = _sampler("rais", labels)
  opt = rj.rais_sgd(0.05)
  step = jax.jit(rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt,
                                    sampler), donate_argnums=0)
  # Copy: donation deletes the buffers, and the fixture's params are shared.
  state = rj.init_train_state(jax.tree.map(jnp.copy, params), opt, sampler)
  for key in jax.random.split(jax.random.key(0), 3):
    state, _ = step(state, key, data)
  assert int(state.step) == 3


def _poisoned(problem, bad):
  """The problem with the inputs of examples ``bad`` set to NaN."""
  data, *rest = problem
  x = np.asarray(data["x"]).copy()
  x[bad] = np.nan
  return ({**data, "x": jnp.asarray(x)}, *rest)


@pytest.mark.parametrize("method,norms", [("usgd", None), ("rais", "proxy"),
                                          ("rais", "exact")])
def test_nonfinite_step_leaves_state_unchanged(problem, method, norms):
  """Every example NaN: no step is applied, each is counted, and the sampler
  skips (and counts) every measurement."""
  init, _, _ = _run(problem, method, 0, norms=norms)
  state, metrics, _ = _run(_poisoned(problem, slice(None)), method, 5, norms=norms)
  jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state),
               (init.params, init.opt_state))
  assert int(state.skipped_steps) == 5 and not np.any(metrics.applied)
  if method == "rais":
    assert int(state.sampler.diagnostics.nonfinite_norms) == 5 * M


@pytest.mark.parametrize("norms", ["proxy", "exact"])
def test_training_survives_nan_examples(problem, norms):
  """3 of 240 examples give NaN losses: the steps that draw one are skipped
  and counted, the rest train as usual. (Uniform draws would hit one in ≈ 18%
  of batches of 16; RAIS hits them in ≈ 38%, because an example never measured
  keeps its "never sampled" feature.)"""
  bad = np.array([0, 1, 2])
  poisoned = _poisoned(problem, bad)
  state, metrics, model_fn = _run(poisoned, "rais", 150, norms=norms)
  applied = np.asarray(metrics.applied)
  np.testing.assert_array_equal(applied, np.isfinite(np.asarray(metrics.loss)))
  skipped = int(state.skipped_steps)
  assert skipped == np.sum(~applied) and 10 <= skipped <= 100
  # Each skipped step drew at least one bad example, and each draw is counted.
  assert int(state.sampler.diagnostics.nonfinite_norms) >= skipped
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert int(state.sampler.diagnostics.pt_solves) >= 10
  clean = jax.tree.map(lambda x: x[3:], problem[0])
  head = rj.softmax_cross_entropy_head()
  before = rj.evaluate(model_fn, head, problem[2], clean)
  after = rj.evaluate(model_fn, head, state.params, clean)
  assert float(after["loss"]) < 0.5 * float(before["loss"])


def test_step_validates_data_and_loss(problem):
  data, model_fn, params, labels = problem
  sampler = _sampler("rais", labels)
  opt = rj.rais_sgd(0.05)
  state = rj.init_train_state(params, opt, sampler)
  step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt, sampler)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=f"data has {N - 1} examples.*n = {N}"):
    step(state, key, jax.tree.map(lambda x: x[:-1], data))
  with pytest.raises(ValueError, match="same leading"):
    step(state, key, {**data, "label": data["label"][:-1]})
  mean_head = lambda out, batch: rj.softmax_cross_entropy_head()(out, batch).mean()
  usgd = _sampler("usgd", labels)
  for norms, s in (("proxy", sampler), ("exact", sampler), (None, usgd)):
    bad = rj.make_train_step(model_fn, mean_head, opt, s, norms=norms)
    with pytest.raises(ValueError, match="per-example losses of shape"):
      bad(rj.init_train_state(params, opt, s), key, data)
