"""The gain-ratio transformation keeps optax's contracts (rais_jax.transform):
every recipe of the user guide against its stock optax optimizer at r = 1, in
every float dtype; τ over long runs; a bad r; injected schedules; gradient
accumulation; and the check that r reaches every parameter."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rais_jax as rj
from rais_jax import transform

LR = 1e-3
SCHEDULE = optax.cosine_decay_schedule(0.05, 200)

# name -> (the rais_jax recipe, the stock optax optimizer it equals at r = 1).
RECIPES = {
    "sgd": (lambda: rj.rais_sgd(LR), lambda: optax.sgd(LR)),
    "momentum": (lambda: rj.rais_sgd(LR, momentum=0.9),
                 lambda: optax.sgd(LR, momentum=0.9)),
    "nesterov": (lambda: rj.rais_sgd(LR, momentum=0.9, nesterov=True),
                 lambda: optax.sgd(LR, momentum=0.9, nesterov=True)),
    "schedule": (lambda: rj.rais_sgd(SCHEDULE, momentum=0.9),
                 lambda: optax.sgd(SCHEDULE, momentum=0.9)),
    "adam": (lambda: optax.chain(optax.scale_by_adam(), rj.scale_by_gain_ratio(LR)),
             lambda: optax.adam(LR)),
    "adamw": (lambda: optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                                  rj.scale_by_gain_ratio(LR)),
              lambda: optax.adamw(LR, weight_decay=1e-4)),
    "lion": (lambda: optax.chain(optax.scale_by_lion(), rj.scale_by_gain_ratio(LR)),
             lambda: optax.lion(LR, weight_decay=0.0)),
    "clipped momentum": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9),
                            rj.scale_by_gain_ratio(LR)),
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR, momentum=0.9))),
}


def _parabola_run(opt, dtype, steps, r=None):
  """``steps`` updates on f(x) = ½ Σ (x − 1)² from x = −1, in ``dtype``."""
  x = jnp.full((3,), -1.0, dtype)
  state = opt.init(x)
  kwargs = {} if r is None else {"gain_ratio": r}

  @jax.jit
  def step(x, state):
    updates, state = opt.update(x - 1, state, x, **kwargs)
    return optax.apply_updates(x, updates), state

  for _ in range(steps):
    x, state = step(x, state)
  return x, state


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_equals_its_stock_optimizer_at_r_1(name):
  ours, stock = RECIPES[name]
  x, _ = _parabola_run(ours(), jnp.float32, 30)
  x_ref, _ = _parabola_run(stock(), jnp.float32, 30)
  np.testing.assert_array_equal(x, x_ref)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_at_r_moves_r_times_as_far(name):
  ours = RECIPES[name][0]()
  params = {"w": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray(0.3)}
  grads = {"w": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(1.0)}
  one, _ = ours.update(grads, ours.init(params), params, gain_ratio=1.0)
  two, _ = ours.update(grads, ours.init(params), params, gain_ratio=2.0)
  chex.assert_trees_all_close(two, jax.tree.map(lambda u: 2 * u, one), rtol=1e-6)


def _x64_or_not(dtype):
  return jax.enable_x64(True) if dtype == "float64" else jax.enable_x64(False)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_sgd_in_every_dtype_is_bit_identical(name, dtype):
  """The step is computed in the parameters' dtype, as optax's is (finding 6:
  float64 at lr 1e-3 got a float32-rounded step; bfloat16 with momentum ended
  elsewhere after 300 steps)."""
  ours, stock = RECIPES[name]
  with _x64_or_not(dtype):
    x, _ = _parabola_run(ours(), jnp.dtype(dtype), 300)
    x_ref, _ = _parabola_run(stock(), jnp.dtype(dtype), 300)
    assert x.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(x, np.float64), np.asarray(x_ref, np.float64))


def test_accumulator_dtype_as_optax_sgd():
  ours = rj.rais_sgd(LR, momentum=0.9, accumulator_dtype=jnp.bfloat16)
  stock = optax.sgd(LR, momentum=0.9, accumulator_dtype=jnp.bfloat16)
  x, state = _parabola_run(ours, jnp.float32, 50)
  x_ref, _ = _parabola_run(stock, jnp.float32, 50)
  np.testing.assert_array_equal(x, x_ref)
  assert state[0].trace.dtype == jnp.bfloat16


def _exact_tau(state: transform.ScaleByGainRatioState) -> float:
  return (float(state.tau_blocks) * 2**24 + float(state.tau_whole)
          + float(state.tau_fraction))


def _start_at(tau: int) -> transform.ScaleByGainRatioState:
  state = rj.scale_by_gain_ratio(LR).init(None)
  return state._replace(tau_blocks=jnp.int32(tau // 2**24),
                        tau_whole=jnp.int32(tau % 2**24))


@functools.lru_cache(maxsize=None)
def _advance_fn(steps: int):
  opt = rj.scale_by_gain_ratio(LR)
  x = jnp.zeros(())

  def body(state, r):
    return opt.update(x, state, gain_ratio=r)[1], None
  return jax.jit(lambda state, rs: jax.lax.scan(body, state, rs)[0])


@pytest.mark.parametrize("start", [10**6, 2**24, 10**9])
def test_tau_keeps_every_increment_on_long_runs(start):
  """Finding 1: a float32 τ froze at 2²⁴ and, from 10⁶, 1000 steps at r = 1.3
  gave 1001312.5. Here τ − start is the sum of the float32 increments to
  within the rounding of their fractions, at 10⁶, 2²⁴ and 10⁹ (≈ 1e9 steps)."""
  r = np.float32(1.3)
  state = _advance_fn(1000)(_start_at(start), jnp.full((1000,), r))
  expected = 1000 * float(r)  # exact in float64
  assert abs(_exact_tau(state) - start - expected) < 1000 * 2**-23
  if start == 10**6:  # the public reading, float32 (ulp 1/16 at 10⁶)
    assert abs(float(rj.equivalent_iterations((state,))) - (start + expected)) <= 1 / 16
  ones = _advance_fn(10)(_start_at(start), jnp.ones((10,)))
  assert _exact_tau(ones) == start + 10


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -1.0, 0.0])
def test_a_bad_gain_ratio_falls_back_to_one_and_is_counted(bad):
  """Finding 2: r = NaN made τ and every later update NaN, inf froze the
  schedule, −1 stepped uphill and moved τ back. Now such an r is replaced by
  1 for that update and counted."""
  opt = rj.rais_sgd(optax.linear_schedule(1.0, 0.0, 100), momentum=0.9)
  params = jnp.ones((3,))
  state = opt.init(params)
  reference, _ = opt.update(params, state, params, gain_ratio=1.0)
  updates, state = opt.update(params, state, params, gain_ratio=bad)
  chex.assert_trees_all_close(updates, reference)
  assert float(rj.equivalent_iterations(state)) == 1.0
  assert int(state[1].invalid_gain_ratios) == 1
  updates, state = opt.update(params, state, params, gain_ratio=2.0)
  assert np.all(np.isfinite(updates)) and float(rj.equivalent_iterations(state)) == 3.0


def test_gain_ratio_must_be_a_scalar():
  """Finding 3: r of shape (3,) was broadcast over the parameters."""
  opt = rj.rais_sgd(0.1)
  params = jnp.ones((3,))
  with pytest.raises(ValueError, match="gain_ratio must be a scalar"):
    opt.update(params, opt.init(params), params, gain_ratio=jnp.ones((3,)))
  with pytest.raises(ValueError, match="must be a scalar"):
    jax.jit(lambda r: opt.update(params, opt.init(params), params, gain_ratio=r))(
        jnp.ones((3,)))


def test_injected_schedule_is_indexed_by_tau():
  """Finding 4: under optax.inject_hyperparams a schedule was evaluated at
  optax's count: after 10 steps at r = 4 on linear_schedule(1, 0, 100) the
  update was −4·s(9) = −3.64; indexed by τ = 36 it is −4·s(36) = −2.56."""
  schedule = optax.linear_schedule(1.0, 0.0, 100)
  opt = rj.inject_hyperparams(rj.rais_sgd)(learning_rate=schedule)
  plain = rj.rais_sgd(schedule)
  params = jnp.ones(())
  state, plain_state = opt.init(params), plain.init(params)
  for _ in range(10):
    updates, state = jax.jit(opt.update)(params, state, params, gain_ratio=4.0)
    plain_updates, plain_state = plain.update(params, plain_state, params, gain_ratio=4.0)
  np.testing.assert_allclose(updates, -4 * schedule(36), rtol=1e-6)
  np.testing.assert_allclose(updates, plain_updates, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), schedule(36), rtol=1e-6)
  # Hyperparameters stay editable in the state, as with optax's.
  hyperparams = dict(state.hyperparams, momentum=jnp.float32(0.0))
  assert set(hyperparams) == {"learning_rate", "momentum"}


def test_multi_steps_average_the_gain_ratio():
  """Finding 5: optax.MultiSteps passed only the k-th mini-step's r (r = 1,
  2, 3, 4 scaled the accumulated update by 4). multi_steps scales it by the
  mean, 2.5, and advances τ by it."""
  opt = rj.multi_steps(rj.rais_sgd(1.0), 4)
  params = jnp.zeros((2,))
  grads = jnp.asarray([1.0, -1.0])
  state = opt.init(params)
  for r in (1.0, 2.0, 3.0, 4.0):
    updates, state = jax.jit(opt.update)(grads, state, params, gain_ratio=r)
    if r < 4:
      np.testing.assert_array_equal(updates, 0.0)
  np.testing.assert_allclose(updates, -2.5 * grads, rtol=1e-6)
  np.testing.assert_allclose(rj.equivalent_iterations(state), 2.5)
  for r in (1.0, 1.0, 1.0, 1.0):  # the next accumulation starts afresh
    updates, state = opt.update(grads, state, params, gain_ratio=r)
  np.testing.assert_allclose(updates, -grads, rtol=1e-6)
  np.testing.assert_allclose(rj.equivalent_iterations(state), 3.5)


def test_every_leaf_must_use_the_gain_ratio():
  """Finding 7: a multi_transform whose second branch is stock optax.sgd was
  accepted; now the leaves that ignore r are named."""
  params = {"body": jnp.ones((3,)), "head": jnp.ones((2,))}
  labels = {"body": "rais", "head": "plain"}
  partial = optax.multi_transform({"rais": rj.rais_sgd(0.1), "plain": optax.sgd(0.1)},
                                  labels)
  with pytest.raises(ValueError, match=r"\['head'\].*ignore the gain_ratio"):
    transform.check_gain_ratio_consumed(optax.with_extra_args_support(partial), params)
  both = optax.multi_transform({"rais": rj.rais_sgd(0.1), "plain": rj.rais_sgd(0.2)},
                               {"body": "rais", "head": "plain"})
  transform.check_gain_ratio_consumed(optax.with_extra_args_support(both), params)
  with pytest.raises(ValueError, match="ignores the gain_ratio"):
    transform.check_gain_ratio_consumed(optax.with_extra_args_support(optax.adam(0.1)),
                                        params)


@pytest.mark.parametrize("name", ["momentum", "adam", "schedule"])
def test_jit_agrees_with_eager_and_a_new_r_does_not_recompile(name):
  """What holds today, kept: jit and eager give the same updates, and r is
  data, not a compile-time constant."""
  opt = RECIPES[name][0]()
  params = jnp.asarray([0.5, -1.0, 2.0])
  update = jax.jit(opt.update)
  state = state_jit = opt.init(params)
  for r in (1.0, 1.7, 3.2):
    eager, state = opt.update(params, state, params, gain_ratio=r)
    jitted, state_jit = update(params, state_jit, params, gain_ratio=r)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6)
  assert update._cache_size() == 1  # pylint: disable=protected-access
