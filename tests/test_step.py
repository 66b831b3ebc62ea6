"""The one training step (rais_jax.step) against a hand computation, on both
drivers: params − r·lr·trace of (1/m) Σ_k w_k ∇f_k with w_k = 1/(n p_k) from
the p each index was drawn with, r read from the moments of earlier steps
only, and τ advanced by the r used. Mutations of the step (the weights set to
ones, r set to 1, r taken after this step's own measurements) must make it
fail: the test proves it can. Full float32 matmuls (``highest_precision``):
a GPU's default TF32 would round the two computations differently."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import problems
import rais_jax as rj
from rais_jax import gain_ratio as gain_ratio_lib
from rais_jax import step as step_lib
from rais_jax import train as train_lib

N, M, CLASSES, K = 96, 8, 4, 4
LR, MOMENTUM = 0.05, 0.9


@pytest.fixture(scope="module")
def problem():
  return problems.classification(N, CLASSES)


def _sampler(method, labels):
  if method == "rais":  # (PT) every 4 steps: fitted after two blocks
    return rj.rais_sampler(rj.default_features(labels, CLASSES), batch_size=M,
                           buffer_size=32, pt_mode="sync", floor=0.05)
  return problems.sampler(method, labels, CLASSES, M, buffer_size=32, mode="sync")


def _norms(method):
  return "exact" if method in ("rais", "osgd", "naive") else None


def _loss_fn(model_fn):
  head = rj.softmax_cross_entropy_head()
  return lambda p, b: head(model_fn(p, b), b)


def _by_hand(model_fn, data, sampler, state, indices, probs, *, measure_first_only,
             grad_rate):
  """The expected (params, trace, moments, Σ r) after the steps of ``indices``
  (S, m) drawn with ``probs``, from ``state``; SGD with momentum written out."""
  loss_fn = _loss_fn(model_fn)
  n = sampler.num_examples
  params, moments = state.params, state.moments
  trace = state.opt_state[0].trace
  tau = float(rj.equivalent_iterations(state.opt_state))
  rs = []
  for s in range(indices.shape[0]):
    idx, p = indices[s], probs[s]
    weights = 1.0 / (n * p)  # from the p drawn with, not the sampler's weights
    batch = jax.tree.map(lambda x: x[idx], data)
    grads = jax.grad(lambda q: jnp.mean(weights * loss_fn(q, batch)))(params)
    r = 1.0
    if sampler.boosts_lr:
      r = float(gain_ratio_lib.estimate(moments, M, r_max=sampler.r_max))
      per_example = jax.vmap(lambda b: jax.grad(
          lambda q: loss_fn(q, jax.tree.map(lambda x: x[None], b))[0])(params))(batch)
      u = jnp.sqrt(sum(jnp.sum(g.reshape(M, -1) ** 2, axis=1)
                       for g in jax.tree.leaves(per_example)))
      measured = (s == 0) or not measure_first_only
      moments = gain_ratio_lib.update(
          moments, u, p, n, optax.tree.norm(grads, squared=True) if measured else None,
          alpha=sampler.ema_rate, grad_alpha=grad_rate if measure_first_only else None)
    rs.append(r)
    trace = jax.tree.map(lambda t, g: g + MOMENTUM * t, trace, grads)
    params = jax.tree.map(lambda q, t: q - LR * r * t, params, trace)
    tau += r
  return params, trace, moments, rs, tau


def _with_r_of_two(state):
  """``state`` with gain-ratio moments whose estimate is r = 2 (m = 8): the
  moments are the step's input, and early in a short run r is ≈ 1, where a
  step that ignored r would pass. Û = 2.6, R̂ = 1, ‖g_R‖² = 0.2 with its
  diagonal part R̂/m: r = 1 + (Û − R̂)/(m (R̂/m + 0.2 − R̂/m)) = 2."""
  moments = gain_ratio_lib.GainRatioState(
      step_averages=jnp.asarray([2.6, 1.0, 1.0], jnp.float32),
      grad_averages=jnp.asarray([0.2, 1.0 / M, 0.0, 1.0], jnp.float32),
      count=jnp.asarray(10, jnp.int32), skipped=jnp.asarray(0, jnp.int32))
  return state.replace(moments=moments)


def _assert_rule(end, gain_ratios, expected, sampler):
  """The state after the steps, and the r they report, are the hand computation's."""
  params, trace, moments, rs, tau = expected
  if sampler.boosts_lr:
    assert rs[0] > 1.05  # a non-trivial r, so that r = 1 is told apart
  np.testing.assert_allclose(gain_ratios, rs, rtol=1e-5)
  _close(end.params, params)
  _close(end.opt_state[0].trace, trace)
  _close(end.moments, moments, rtol=1e-4)
  np.testing.assert_allclose(float(rj.equivalent_iterations(end.opt_state)), tau,
                             rtol=1e-6)


def _close(got, want, rtol=2e-5, atol=1e-7):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               got, want)


MUTATIONS = {
    "weights set to ones": ("indices, weights = drawn.indices, drawn.weights",
                            "indices, weights = drawn.indices, jnp.ones_like(drawn.weights)"),
    "r set to 1": ("r = spec.gain_ratio(moments)", "r = jnp.ones((), jnp.float32)"),
    "r from this step": (
        "  r = spec.gain_ratio(moments)\n",
        "",
        "  extra = {} if smp.optimizer_args",
        "  r = spec.gain_ratio(moments)\n  extra = {} if smp.optimizer_args"),
}


def _cases(methods, mutated):
  """Every method unmutated; every mutation on the methods in ``mutated``."""
  return ([(m, None) for m in methods]
          + [(m, name) for m in mutated for name in MUTATIONS])


def _mutate(monkeypatch, name):
  """Applies a mutation of train_step's source for the test (None: none)."""
  if name is None:
    return
  source = inspect.getsource(step_lib.train_step)
  edits = MUTATIONS[name]
  for old, new in zip(edits[::2], edits[1::2]):
    assert old in source, old
    source = source.replace(old, new, 1)
  namespace = dict(vars(step_lib))
  exec(compile(source, step_lib.__file__, "exec"), namespace)  # pylint: disable=exec-used
  monkeypatch.setattr(step_lib, "train_step", namespace["train_step"])
  monkeypatch.setattr(train_lib, "train_step", namespace["train_step"])


def _check_or_expect_failure(mutation, method, check):
  if mutation == "weights set to ones":  # U-SGD's weights are ones anyway
    affected = method != "usgd"
  else:  # r is 1 for the methods that do not raise the learning rate
    affected = mutation is not None and method in ("rais", "osgd", "naive")
  if not affected:
    check()
    return
  with pytest.raises(AssertionError):
    check()


@pytest.mark.parametrize("method, mutation", _cases(
    ["rais", "osgd", "naive", "loss-is", "usgd"], ["rais", "loss-is"]))
def test_fast_path_block_is_the_update_rule(problem, monkeypatch, method, mutation,
                                           highest_precision):
  """A block of K steps on the fast path (the first measuring ‖g_R‖² at the
  block rate) from a fitted, non-uniform sampler."""
  _mutate(monkeypatch, mutation)
  data, model_fn, params, labels = problem
  sampler = _sampler(method, labels)
  runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(),
                          rj.rais_sgd(LR, momentum=MOMENTUM), sampler,
                          norms=_norms(method), block_size=K, oracle_period=8)
  key = jax.random.key(7)
  with runner:
    state, _ = runner.run(runner.init(params), key, data, 3 * K)  # fitted
    if method == "rais":
      assert bool(state.sampler.fitted)
    state = _with_r_of_two(jax.device_put(jax.device_get(state)))
    start = jax.tree.map(jnp.copy, state)
    drawn = runner.programs.draw(start, jax.random.fold_in(key, int(start.step)))
    if sampler.probabilities is not None and method != "usgd":
      p = np.asarray(sampler.probabilities(start.sampler))
      assert p.max() > 1.5 / N  # not uniform
    end, metrics = runner.run(state, key, data, K)

  _check_or_expect_failure(mutation, method, lambda: _assert_rule(
      end, metrics.gain_ratio, _by_hand(
          model_fn, data, sampler, start, drawn.indices, drawn.probs,
          measure_first_only=True,
          grad_rate=step_lib.grad_rate(sampler.ema_rate, K)), sampler))


@pytest.mark.parametrize("method, mutation", _cases(
    ["rais", "osgd", "naive", "loss-is", "usgd"], ["rais"]))
def test_per_step_api_is_the_update_rule(problem, monkeypatch, method, mutation,
                                        highest_precision):
  """One step of make_train_step (‖g_R‖² measured every step, at rate α)."""
  _mutate(monkeypatch, mutation)
  data, model_fn, params, labels = problem
  sampler = _sampler(method, labels)
  optimizer = rj.rais_sgd(LR, momentum=MOMENTUM)
  step = jax.jit(rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(),
                                    optimizer, sampler, norms=_norms(method),
                                    oracle_period=8))
  state = rj.init_train_state(params, optimizer, sampler)
  for i in range(12):  # fitted
    state, _ = step(state, jax.random.key(i), data)
  state = _with_r_of_two(state)
  start = jax.tree.map(jnp.copy, state)
  key = jax.random.key(99)
  drawn = sampler.sample(start.sampler, key)
  end, metrics = step(state, key, data)

  _check_or_expect_failure(mutation, method, lambda: _assert_rule(
      end, jnp.atleast_1d(metrics.gain_ratio), _by_hand(
          model_fn, data, sampler, start, drawn.indices[None], drawn.probs[None],
          measure_first_only=False, grad_rate=None), sampler))
