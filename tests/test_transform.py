import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rais_jax import (epochs_equivalent, equivalent_iterations, rais_sgd,
                      scale_by_gain_ratio)
from rais_jax.transform import check_gain_ratio_consumed

PARAMS = {"w": jnp.ones((3,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
GRADS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(1.0)}


def test_scales_lr_and_indexes_schedule_by_tau():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  opt = scale_by_gain_ratio(schedule)
  state = opt.init(PARAMS)
  updates, state = opt.update(GRADS, state, gain_ratio=2.0)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -2.0 * g, GRADS))
  updates, state = opt.update(GRADS, state, gain_ratio=3.0)
  # τ = 2 now, so lr = schedule(2) = 0.8, scaled by r = 3.
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -2.4 * g, GRADS))
  assert float(state.tau) == 5.0 and int(state.count) == 2


def test_schedule_advance_moves_tau_without_scaling_the_step():
  """InfoBatch's pruned epochs: τ advances by ``schedule_advance``, the step
  size stays lr(τ) · r."""
  opt = scale_by_gain_ratio(optax.linear_schedule(1.0, 0.0, 10))
  state = opt.init(PARAMS)
  updates, state = opt.update(GRADS, state, schedule_advance=2.5)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -g, GRADS))
  updates, state = opt.update(GRADS, state, gain_ratio=1.0, schedule_advance=2.5)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -0.75 * g, GRADS))
  assert float(state.tau) == 5.0


def test_default_gain_ratio_is_plain_sgd():
  opt = rais_sgd(0.1, momentum=0.9)
  ref = optax.sgd(0.1, momentum=0.9)
  s, s_ref = opt.init(PARAMS), ref.init(PARAMS)
  for _ in range(3):
    u, s = opt.update(GRADS, s, PARAMS)
    u_ref, s_ref = ref.update(GRADS, s_ref, PARAMS)
    chex.assert_trees_all_close(u, u_ref)


def test_chains_after_optax_sgd_with_momentum():
  opt = optax.chain(optax.sgd(0.1, momentum=0.9),
                    scale_by_gain_ratio(1.0, flip_sign=False))
  ref = optax.sgd(0.1, momentum=0.9)
  s, s_ref = opt.init(PARAMS), ref.init(PARAMS)
  for r in (1.0, 2.0, 1.5):
    u, s = opt.update(GRADS, s, PARAMS, gain_ratio=r)
    u_ref, s_ref = ref.update(GRADS, s_ref, PARAMS)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: r * x, u_ref))
  np.testing.assert_allclose(equivalent_iterations(s), 4.5)


def test_inject_hyperparams_and_jit():
  opt = optax.inject_hyperparams(rais_sgd)(learning_rate=0.1, momentum=0.9)
  state = opt.init(PARAMS)
  update = jax.jit(opt.update)
  u, state2 = update(GRADS, state, PARAMS, gain_ratio=jnp.float32(2.0))
  chex.assert_trees_all_close(u, jax.tree.map(lambda g: -0.2 * g, GRADS))
  # State structure and dtypes are stable across steps (scan-compatible).
  chex.assert_trees_all_equal_structs(state, state2)
  chex.assert_trees_all_equal_dtypes(state, state2)
  np.testing.assert_allclose(epochs_equivalent(state2, batch_size=10, num_examples=100), 0.2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_update_dtypes_follow_params(dtype):
  params = jax.tree.map(lambda x: x.astype(dtype), PARAMS)
  grads = jax.tree.map(lambda x: x.astype(dtype), GRADS)
  opt = rais_sgd(optax.cosine_decay_schedule(0.1, 100))
  u, _ = opt.update(grads, opt.init(params), params, gain_ratio=1.7)
  chex.assert_trees_all_equal_dtypes(u, params)


def test_scan_over_steps():
  opt = rais_sgd(0.1, momentum=0.9)

  def body(carry, r):
    params, state = carry
    u, state = opt.update(GRADS, state, params, gain_ratio=r)
    return (optax.apply_updates(params, u), state), None

  (params, state), _ = jax.lax.scan(body, (PARAMS, opt.init(PARAMS)),
                                    jnp.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(equivalent_iterations(state), 6.0)


def test_missing_state_error():
  with pytest.raises(ValueError, match="no scale_by_gain_ratio state"):
    equivalent_iterations(optax.sgd(0.1).init(PARAMS))


def test_adamw_recipe_takes_the_gain_ratio():
  """AdamW for RAIS: Adam's direction, decoupled weight decay, then the
  r-scaled, τ-indexed learning rate (the user guide, "Any optax optimizer")."""
  schedule = optax.cosine_decay_schedule(1e-2, 100)
  opt = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                    scale_by_gain_ratio(schedule))
  ref = optax.adamw(schedule, weight_decay=1e-4)
  check_gain_ratio_consumed(opt, PARAMS)
  s, s_ref = opt.init(PARAMS), ref.init(PARAMS)
  u, s = opt.update(GRADS, s, PARAMS)  # r = 1: AdamW itself
  u_ref, s_ref = ref.update(GRADS, s_ref, PARAMS)
  chex.assert_trees_all_close(u, u_ref, rtol=1e-6)
  u2, s2 = opt.update(GRADS, s, PARAMS, gain_ratio=2.5)
  u2_ref, _ = ref.update(GRADS, s_ref, PARAMS)
  # Scaled by r, with the schedule read at τ = 1 (both at step 1 here).
  chex.assert_trees_all_close(u2, jax.tree.map(lambda x: 2.5 * x, u2_ref), rtol=1e-6)
  np.testing.assert_allclose(equivalent_iterations(s2), 3.5)


_LR = 0.1
# The user guide's recipes ("Any optax optimizer"), each beside the stock optax
# optimizer it equals at r = 1.
RECIPES = {
    "sgd": (rais_sgd(_LR), optax.sgd(_LR)),
    "momentum": (rais_sgd(_LR, momentum=0.9, nesterov=True),
                 optax.sgd(_LR, momentum=0.9, nesterov=True)),
    "adam": (optax.chain(optax.scale_by_adam(), scale_by_gain_ratio(_LR)),
             optax.adam(_LR)),
    "adamw": (optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4),
                          scale_by_gain_ratio(_LR)), optax.adamw(_LR, weight_decay=1e-4)),
    "clipped momentum": (
        optax.chain(optax.clip_by_global_norm(1.0), optax.trace(0.9),
                    scale_by_gain_ratio(_LR)),
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(_LR, momentum=0.9))),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_moves_parameters_by_r_times_lr(name):
  """At r = 1 a recipe is its stock optax optimizer; at r it moves the
  parameters r times as far (two steps, the second after a first one)."""
  opt, ref = RECIPES[name]
  check_gain_ratio_consumed(opt, PARAMS)
  s, s_ref = opt.init(PARAMS), ref.init(PARAMS)
  for _ in range(2):
    u, s_next = opt.update(GRADS, s, PARAMS)
    u_ref, s_ref = ref.update(GRADS, s_ref, PARAMS)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-6)
    u_r, _ = opt.update(GRADS, s, PARAMS, gain_ratio=3.0)
    chex.assert_trees_all_close(u_r, jax.tree.map(lambda x: 3.0 * x, u), rtol=1e-6)
    s = s_next


@pytest.mark.parametrize("opt, consumed", [
    (optax.sgd(0.1, momentum=0.9), False),
    (optax.adamw(1e-3), False),
    (optax.chain(scale_by_gain_ratio(0.1), optax.trace(0.9)), True),
    (optax.inject_hyperparams(rais_sgd)(learning_rate=0.1), True),
])
def test_check_gain_ratio_consumed(opt, consumed):
  if consumed:
    check_gain_ratio_consumed(opt, PARAMS)
  else:
    with pytest.raises(ValueError, match="ignores the gain_ratio.*rais_sgd.*Adam"):
      check_gain_ratio_consumed(opt, PARAMS)
