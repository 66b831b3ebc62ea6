"""Optax transformations that turn a gain ratio into a larger learning rate.

RAIS-SGD uses η_t = r_t · lr(τ_t), where r_t is the gain ratio and
τ_t = Σ_{t' < t} r_{t'} counts *equivalent* iterations: steps with r-times less
gradient variance are worth r plain steps, so the schedule advances r times as
fast. ``epochs equivalent`` = τ · m / n.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax


# τ = blocks · 2²⁴ + whole + fraction: integer parts are exact, so every
# increment is kept to the float32 rounding of its fraction, however long the
# run (a float32 sum stops moving at 2²⁴).
_BLOCK = 1 << 24


class ScaleByGainRatioState(NamedTuple):
  """Step count and τ, the number of equivalent iterations taken so far.

  τ is held exactly in parts (read it with :func:`equivalent_iterations`):
  ``tau_blocks`` · 2²⁴ + ``tau_whole`` + ``tau_fraction``.
  """

  count: chex.Array  # int32
  tau_blocks: chex.Array  # int32
  tau_whole: chex.Array  # int32 in [0, 2²⁴)
  tau_fraction: chex.Array  # float32 in [0, 1)
  # int32: updates whose gain ratio was not a finite positive number; they
  # used r = 1 instead.
  invalid_gain_ratios: chex.Array

  @property
  def tau(self) -> chex.Array:
    """τ as float32 (rounded once, at reading)."""
    return (self.tau_blocks.astype(jnp.float32) * float(_BLOCK)
            + (self.tau_whole.astype(jnp.float32) + self.tau_fraction))


def _advance(state: ScaleByGainRatioState, amount: chex.Array
             ) -> tuple[chex.Array, chex.Array, chex.Array]:
  """(blocks, whole, fraction) of τ + ``amount`` (≥ 0, float32)."""
  whole = jnp.floor(amount)
  fraction = state.tau_fraction + (amount - whole)  # both in [0, 1): < 2
  carry = jnp.floor(fraction)
  whole = state.tau_whole + whole.astype(jnp.int32) + carry.astype(jnp.int32)
  return (state.tau_blocks + whole // _BLOCK, whole % _BLOCK,
          (fraction - carry).astype(jnp.float32))


def _checked_scalar(name: str, value: chex.Numeric) -> chex.Array:
  """``value`` as a float32 scalar, or one clear error at trace time."""
  if jnp.ndim(value) != 0:
    raise ValueError(
        f"{name} must be a scalar (one number for the whole update); got shape "
        f"{jnp.shape(value)}. Pass e.g. runner.gain_ratio(state), not per-example "
        "or per-parameter values.")
  return jnp.asarray(value, jnp.float32)


def scale_by_gain_ratio(
    learning_rate: optax.ScalarOrSchedule = 1.0,
    *,
    flip_sign: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Scales updates by −r_t · lr(τ_t) (by r_t · lr(τ_t) if not ``flip_sign``).

  Use it where ``optax.scale_by_learning_rate`` would go, e.g.
  ``optax.chain(optax.trace(0.9), scale_by_gain_ratio(schedule))`` is SGD with
  momentum whose learning rate is raised by r and whose schedule is indexed by
  τ = Σ_{t' < t} r_{t'}. ``learning_rate=1.0, flip_sign=False`` turns it into
  a pure rescaling by r, to put after any complete optimizer such as
  ``optax.sgd(lr, momentum=0.9)`` (the schedule of that optimizer then counts
  plain steps).

  The gain ratio is the keyword extra argument ``gain_ratio`` of ``update``
  (default 1, i.e. plain SGD), a scalar (anything else is refused at trace
  time). An r that is not a finite positive number (NaN, ±inf, ≤ 0: an
  estimator that overflowed) is replaced by 1 for that update, so neither the
  parameters nor τ see it, and counted in ``invalid_gain_ratios``.
  ``schedule_advance`` (default: r) sets how far τ moves instead, without
  changing the step size: InfoBatch (:mod:`rais_jax.baselines.info_batch`)
  passes (n/m)/s in an epoch pruned to s steps, so that its schedule stays
  indexed by data epochs (a non-finite or negative one falls back to r).

  The step is computed in each update's own dtype, as ``optax.scale`` does:
  at r = 1 this is ``optax.scale_by_learning_rate`` bit for bit (float64,
  float32, bfloat16, float16). τ is exact to the float32 rounding of each
  increment for any run length (its integer part is held in integers).

  Args:
    learning_rate: a scalar or an ``optax.Schedule`` evaluated at τ.
    flip_sign: whether to negate, as gradient *descent* needs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params: optax.Params) -> ScaleByGainRatioState:
    del params
    i0 = lambda: jnp.zeros((), jnp.int32)
    return ScaleByGainRatioState(count=i0(), tau_blocks=i0(), tau_whole=i0(),
                                 tau_fraction=jnp.zeros((), jnp.float32),
                                 invalid_gain_ratios=i0())

  def update_fn(updates: optax.Updates, state: ScaleByGainRatioState,
                params: Optional[optax.Params] = None, *,
                gain_ratio: chex.Numeric = 1.0,
                schedule_advance: Optional[chex.Numeric] = None,
                **extra_args: Any) -> tuple[optax.Updates, ScaleByGainRatioState]:
    del params, extra_args
    r = _checked_scalar("gain_ratio", gain_ratio)
    valid = jnp.isfinite(r) & (r > 0)
    r = jnp.where(valid, r, 1.0)
    advance = r
    if schedule_advance is not None:
      given = _checked_scalar("schedule_advance", schedule_advance)
      advance = jnp.where(jnp.isfinite(given) & (given >= 0), given, r)
    if callable(learning_rate):
      lr = learning_rate(state.tau)
      scaled = sign * jnp.asarray(lr)
    else:  # a Python number stays exact until cast to each update's dtype
      scaled = sign * learning_rate

    def scale(u):
      # As optax.scale: the factor in the update's dtype; then r, exact at 1.
      return (jnp.asarray(scaled, u.dtype) * jnp.asarray(r, u.dtype)) * u

    blocks, whole, fraction = _advance(state, advance)
    return jax.tree.map(scale, updates), ScaleByGainRatioState(
        count=optax.safe_increment(state.count), tau_blocks=blocks,
        tau_whole=whole, tau_fraction=fraction,
        invalid_gain_ratios=state.invalid_gain_ratios + (~valid).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rais_sgd(learning_rate: optax.ScalarOrSchedule, momentum: Optional[float] = None,
             nesterov: bool = False, accumulator_dtype: Optional[Any] = None
             ) -> optax.GradientTransformationExtraArgs:
  """SGD (optionally with momentum) whose learning rate is r_t · lr(τ_t).

  The same as ``optax.sgd`` (the same arguments; at r = 1 bit for bit) except
  that the learning rate is scaled by the ``gain_ratio`` extra argument and
  the schedule is indexed by τ. Under a hyperparameter injection use
  :func:`inject_hyperparams` (``optax.inject_hyperparams`` evaluates an
  injected schedule at its own step count, not at τ); for gradient
  accumulation :func:`multi_steps`.
  """
  return optax.chain(
      optax.trace(decay=momentum, nesterov=nesterov,
                  accumulator_dtype=accumulator_dtype)
      if momentum is not None else optax.identity(),
      scale_by_gain_ratio(learning_rate))


class InjectHyperparamsState(NamedTuple):
  """As ``optax.InjectHyperparamsState``: the step count, the current
  hyperparameters (read or change them here) and the inner state."""

  count: chex.Array  # int32
  hyperparams: dict[str, chex.Array]
  inner_state: optax.OptState


def inject_hyperparams(factory: Callable[..., optax.GradientTransformation]
                       ) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` whose schedules are evaluated at τ.

  ``inject_hyperparams(rais_sgd)(learning_rate=schedule, momentum=0.9)``
  keeps the hyperparameters in the state (``state.hyperparams``, as optax's
  does: read or change them there), and evaluates a schedule given for one at
  the τ of the inner optimizer's :func:`scale_by_gain_ratio` before each
  update (optax's evaluates it at its own step count, so with r > 1 the
  schedule would lag). Numeric hyperparameters become arrays in the state;
  other arguments are passed through.
  """
  def build(**kwargs: Any) -> optax.GradientTransformationExtraArgs:
    schedules = {k: v for k, v in kwargs.items() if callable(v)}
    numeric = {k: v for k, v in kwargs.items()
               if k not in schedules and isinstance(v, (int, float, jax.Array))
               and not isinstance(v, bool)}
    static = {k: v for k, v in kwargs.items() if k not in schedules | numeric}

    def inner(hyperparams):
      return optax.with_extra_args_support(factory(**static, **hyperparams))

    def init_fn(params):
      hyperparams = {k: jnp.asarray(v, jnp.float32) for k, v in numeric.items()}
      hyperparams |= {k: jnp.asarray(s(0), jnp.float32) for k, s in schedules.items()}
      return InjectHyperparamsState(
          count=jnp.zeros((), jnp.int32), hyperparams=hyperparams,
          inner_state=inner(hyperparams).init(params))

    def update_fn(updates, state, params=None, **extra_args):
      tau = equivalent_iterations(state.inner_state)
      hyperparams = dict(state.hyperparams)
      hyperparams |= {k: jnp.asarray(s(tau), jnp.float32) for k, s in schedules.items()}
      updates, inner_state = inner(hyperparams).update(
          updates, state.inner_state, params, **extra_args)
      return updates, InjectHyperparamsState(
          count=optax.safe_increment(state.count), hyperparams=hyperparams,
          inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

  return build


class MultiStepsGainRatioState(NamedTuple):
  gain_ratio_sum: chex.Array  # float32: Σ r over this accumulation's mini-steps
  inner: optax.MultiStepsState


def multi_steps(optimizer: optax.GradientTransformation, every_k_schedule: int
                ) -> optax.GradientTransformationExtraArgs:
  """Gradient accumulation over k mini-steps (``optax.MultiSteps``) with the
  gain ratio averaged over them.

  ``optax.MultiSteps`` hands its inner optimizer the extra arguments of the
  k-th mini-step only, so the accumulated update would be scaled by the last
  r alone and τ advanced by it. Here the inner optimizer gets the mean r̄ of
  the k mini-steps' ratios: the update of the k accumulated gradients is
  scaled by r̄ and τ advances by r̄ per accumulated update. (Each r estimates
  the gain of one mini-batch of m; r̄ is their mean, not a ratio estimated
  for the k·m batch.)
  """
  accumulate = optax.MultiSteps(optimizer, every_k_schedule)

  def init_fn(params):
    return MultiStepsGainRatioState(jnp.zeros((), jnp.float32), accumulate.init(params))

  def update_fn(updates, state, params=None, *, gain_ratio: chex.Numeric = 1.0,
                **extra_args):
    r_sum = state.gain_ratio_sum + _checked_scalar("gain_ratio", gain_ratio)
    mini = state.inner.mini_step  # mini-steps already accumulated
    updates, inner = accumulate.update(
        updates, state.inner, params, gain_ratio=r_sum / (mini + 1), **extra_args)
    restarted = inner.mini_step == 0  # this call emitted the accumulated update
    return updates, MultiStepsGainRatioState(jnp.where(restarted, 0.0, r_sum), inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _dependent_outputs(jaxpr, index: int) -> list[bool]:
  """For each output of ``jaxpr``, whether it depends on input ``index``
  (conservatively: an equation with a dependent input taints all outputs)."""
  tainted = {jaxpr.invars[index]}
  for eqn in jaxpr.eqns:
    if any(not hasattr(v, "val") and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [not hasattr(v, "val") and v in tainted for v in jaxpr.outvars]


def check_gain_ratio_consumed(optimizer: optax.GradientTransformation,
                              params: optax.Params) -> None:
  """Raises one clear error unless **every** leaf of ``optimizer``'s updates
  depends on its ``gain_ratio`` extra argument.

  A stock ``optax.sgd`` or ``optax.adam`` accepts the argument and ignores
  it: RAIS would then sample by importance but train at the plain learning
  rate, silently; an ``optax.multi_transform`` with one branch that ignores
  it would do so for those parameters (named in the error). Works on abstract
  ``params`` (shapes only, e.g. tracers). What it cannot see: an update that
  depends on r only to undo it (e.g. ``optax.clip_by_global_norm`` after the
  scaling, clipping the raised step back), since it reads data dependence,
  not values.
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
  depends = _dependent_outputs(jaxpr.jaxpr, 0)
  if not any(depends):
    raise ValueError(
        "The optimizer ignores the gain_ratio extra argument, so RAIS would "
        "sample by importance but not raise the learning rate (no speed-up). "
        f"{fix}")
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(jax.eval_shape(
               updates, jax.ShapeDtypeStruct((), jnp.float32), shapes))[0]]
  ignored = [path for path, dep in zip(paths, depends) if not dep]
  if ignored:
    raise ValueError(
        f"The optimizer's updates of {', '.join(ignored)} ignore the gain_ratio "
        "extra argument (e.g. a branch of optax.multi_transform without "
        "rais_jax.scale_by_gain_ratio): those parameters would train at the "
        f"plain learning rate while the others get r. {fix}")


def equivalent_iterations(opt_state: optax.OptState) -> chex.Array:
  """τ of the (first) :func:`scale_by_gain_ratio` inside ``opt_state`` (float32)."""
  states = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ScaleByGainRatioState))
            if isinstance(x, ScaleByGainRatioState)]
  if not states:
    raise ValueError("opt_state holds no scale_by_gain_ratio state (no τ).")
  return states[0].tau


def epochs_equivalent(opt_state: optax.OptState, batch_size: int,
                      num_examples: int) -> chex.Array:
  """τ · m / n: how many epochs of plain SGD the run so far is worth."""
  return equivalent_iterations(opt_state) * batch_size / num_examples
