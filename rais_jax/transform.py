"""Optax transformations that turn a gain ratio into a larger learning rate.

RAIS-SGD uses η_t = r_t · lr(τ_t), where r_t is the gain ratio and
τ_t = Σ_{t' < t} r_{t'} counts *equivalent* iterations: steps with r-times less
gradient variance are worth r plain steps, so the schedule advances r times as
fast. ``epochs equivalent`` = τ · m / n.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax


class ScaleByGainRatioState(NamedTuple):
  """Step count and τ, the number of equivalent iterations taken so far."""

  count: chex.Array  # int32
  tau: chex.Array  # float32


def scale_by_gain_ratio(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    flip_sign: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by −r_t · lr(τ_t) (by r_t · lr(τ_t) if not ``flip_sign``).

  Use it where ``optax.scale_by_learning_rate`` would go, e.g.
  ``optax.chain(optax.trace(0.9), scale_by_gain_ratio(schedule))`` is SGD with
  momentum whose learning rate is raised by r and whose schedule is indexed by
  τ. ``learning_rate=1.0, flip_sign=False`` turns it into a pure rescaling by r,
  to put after any complete optimizer such as ``optax.sgd(lr, momentum=0.9)``
  (the schedule of that optimizer then counts plain steps).

  The gain ratio is the keyword extra argument ``gain_ratio`` of ``update``
  (default 1, i.e. plain SGD). ``schedule_advance`` (default: r) sets how far
  τ moves instead, without changing the step size: InfoBatch
  (:mod:`rais_jax.baselines.info_batch`) passes (n/m)/s in an epoch pruned to s steps, so
  that its schedule stays indexed by data epochs.

  Args:
    learning_rate: a scalar or an ``optax.Schedule`` evaluated at τ.
    flip_sign: whether to negate, as gradient *descent* needs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params: optax.Params) -> ScaleByGainRatioState:
    del params
    return ScaleByGainRatioState(count=jnp.zeros((), jnp.int32),
                                 tau=jnp.zeros((), jnp.float32))

  def update_fn(updates: optax.Updates, state: ScaleByGainRatioState,
                params: Optional[optax.Params] = None, *,
                gain_ratio: chex.Numeric = 1.0,
                schedule_advance: Optional[chex.Numeric] = None,
                **extra_args: Any) -> tuple[optax.Updates, ScaleByGainRatioState]:
    del params, extra_args
    r = jnp.asarray(gain_ratio, jnp.float32)
    advance = r if schedule_advance is None else jnp.asarray(schedule_advance,
                                                             jnp.float32)
    lr = learning_rate(state.tau) if callable(learning_rate) else learning_rate
    step_size = sign * r * lr
    updates = jax.tree.map(
        lambda u: (step_size * u).astype(u.dtype), updates)
    return updates, ScaleByGainRatioState(
        count=optax.safe_increment(state.count), tau=state.tau + advance)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rais_sgd(learning_rate: optax.ScalarOrSchedule, momentum: Optional[float] = None,
             nesterov: bool = False) -> optax.GradientTransformationExtraArgs:
  """SGD (optionally with momentum) whose learning rate is r_t · lr(τ_t).

  The same as ``optax.sgd`` except that the learning rate is scaled by the
  ``gain_ratio`` extra argument and the schedule is indexed by τ. Works under
  ``optax.inject_hyperparams``.
  """
  return optax.chain(
      optax.trace(decay=momentum, nesterov=nesterov)
      if momentum is not None else optax.identity(),
      scale_by_gain_ratio(learning_rate))


def _uses_input(jaxpr, index: int) -> bool:
  """Whether any output of ``jaxpr`` depends on its input ``index``
  (conservatively: an equation with a dependent input taints all outputs)."""
  tainted = {jaxpr.invars[index]}
  for eqn in jaxpr.eqns:
    if any(not hasattr(v, "val") and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return any(not hasattr(v, "val") and v in tainted for v in jaxpr.outvars)


def check_gain_ratio_consumed(optimizer: optax.GradientTransformation,
                              params: optax.Params) -> None:
  """Raises one clear error unless ``optimizer``'s updates depend on its
  ``gain_ratio`` extra argument.

  A stock ``optax.sgd`` or ``optax.adam`` accepts the argument and ignores
  it: RAIS would then sample by importance but train at the plain learning
  rate, silently. Works on abstract ``params`` (shapes only, e.g. tracers).
  """
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
                        params)

  def updates(r, p):
    return optimizer.update(p, optimizer.init(p), p, gain_ratio=r)[0]

  fix = ("Use rais_jax.rais_sgd(schedule, momentum=...), or chain "
         "rais_jax.scale_by_gain_ratio(schedule) after any optax transform, e.g. "
         "optax.chain(optax.scale_by_adam(), rais_jax.scale_by_gain_ratio(schedule)) "
         "for Adam.")
  try:
    jaxpr = jax.make_jaxpr(updates)(jax.ShapeDtypeStruct((), jnp.float32), shapes)
  except TypeError as e:
    if "gain_ratio" not in str(e):
      raise
    raise ValueError(
        "The optimizer does not accept the gain_ratio extra argument (it is an "
        f"optax.GradientTransformation without extra args). {fix}") from e
  if not _uses_input(jaxpr.jaxpr, 0):
    raise ValueError(
        "The optimizer ignores the gain_ratio extra argument, so RAIS would "
        "sample by importance but not raise the learning rate (no speed-up). "
        f"{fix}")


def equivalent_iterations(opt_state: optax.OptState) -> chex.Array:
  """τ stored by the (first) :func:`scale_by_gain_ratio` inside ``opt_state``."""
  taus = optax.tree_utils.tree_get_all_with_path(opt_state, "tau")
  if not taus:
    raise ValueError("opt_state holds no scale_by_gain_ratio state (no 'tau').")
  return taus[0][1]


def epochs_equivalent(opt_state: optax.OptState, batch_size: int,
                      num_examples: int) -> chex.Array:
  """τ · m / n: how many epochs of plain SGD the run so far is worth."""
  return equivalent_iterations(opt_state) * batch_size / num_examples
