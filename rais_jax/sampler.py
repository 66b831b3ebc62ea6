"""A sampling method as a value: :class:`Sampler`, pure functions and static facts.

Like an optax ``GradientTransformation``, a sampler is built by its factory
(:func:`rais_jax.rais_sampler`, :func:`uniform_sampler`,
:func:`rais_jax.oracle_sampler`, the baselines in :mod:`rais_jax.baselines`)
and holds only pure functions over one state pytree and facts the step reads
at trace time: whether it measures gradient norms, whether it raises the
learning rate by the gain ratio, whether it chooses inside the step, what it
does at period boundaries. The step (:mod:`rais_jax.step`) and its two drivers
(:func:`rais_jax.make_runner`, :func:`rais_jax.make_train_step`) read those
facts, never a method's name, so a new method is one module: a factory that
returns a :class:`Sampler`.

The protocol. A drawn block has shape (K, m) (one step: (m,)):

* ``init()`` → state;
* ``draw(state, key, shape)`` → a :class:`Sample` (indices, p, weights 1/(n p)),
  or, for a method with ``select``, its candidates;
* ``fold_in(state, drawn, measured)`` → state after the block: ``measured`` is
  the per-example gradient norms u_k (``measures_norms``), the per-example
  losses (``folds_losses``) or None, with the shape of ``drawn.indices``;
* ``select(state, drawn_step, candidate_losses)`` → (indices (m,), weights
  (m,), state), optional: methods that forward candidates and choose which to
  backpropagate inside the step (the step carries their state);
* ``optimizer_args(state)`` → extra keyword arguments of the optimizer's
  update (e.g. InfoBatch's ``schedule_advance``), optional;
* ``plan_epoch(state, key)`` → state and ``epoch_steps(state)``, optional:
  methods that plan each epoch (train them epoch by epoch);
* ``refresh(state, norms)`` → state, optional: receives the exact norms of
  all n examples on the driver's period (the O-SGD oracle);
* ``pt``: the periodic (PT) solve (:class:`rais_jax.pt.PeriodicSolve`) or None;
* ``probabilities(state)`` → p over all n (O(n); analysis), and
  ``set_parameters(state, c, d)`` for the robust samplers, optional.

Reference: Johnson & Guestrin, NeurIPS 2018.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from rais_jax import struct

PyTree = Any


class Sample(NamedTuple):
  indices: chex.Array  # (..., m) int32
  probs: chex.Array  # (..., m) p_k
  weights: chex.Array  # (..., m) 1 / (n p_k)


class Sampler(NamedTuple):
  """A sampling method: its pure functions and static facts (see the module)."""

  name: str  # for messages and results; never tested by the step
  num_examples: int
  batch_size: int
  feature_names: tuple[str, ...]
  init: Callable[[], PyTree]
  draw: Callable[[PyTree, chex.PRNGKey, tuple[int, ...]], Any]
  fold_in: Callable[[PyTree, Any, Optional[chex.Array]], PyTree]
  measures_norms: bool = False  # the step measures u_k and folds them in
  folds_losses: bool = False  # the step folds the per-example losses in
  boosts_lr: bool = False  # the learning rate is raised by the gain ratio r
  unbiased: bool = True  # the minibatch gradient is unbiased for ∇F
  needs_all_data: bool = False  # the whole training set on device (no loader)
  ema_rate: float = 0.1  # α of the gain ratio's moving averages
  r_max: Optional[float] = None  # upper clip of r (default m)
  select: Optional[Callable[..., tuple[chex.Array, chex.Array, PyTree]]] = None
  optimizer_args: Optional[Callable[[PyTree], dict[str, chex.Array]]] = None
  plan_epoch: Optional[Callable[[PyTree, chex.PRNGKey], PyTree]] = None
  epoch_steps: Optional[Callable[[PyTree], chex.Array]] = None
  refresh: Optional[Callable[[PyTree, chex.Array], PyTree]] = None
  pt: Any = None  # rais_jax.pt.PeriodicSolve, or None
  probabilities: Optional[Callable[[PyTree], chex.Array]] = None
  set_parameters: Optional[Callable[[PyTree, chex.Array, chex.Array], PyTree]] = None

  def sample(self, state: PyTree, key: chex.PRNGKey) -> Any:
    """One step's draw: m indices."""
    return self.draw(state, key, (self.batch_size,))

  @property
  def pt_mode(self) -> str:
    """``"async"`` or ``"sync"``: how the per-step API hands (PT) off."""
    return "sync" if self.pt is None else self.pt.mode

  def close(self) -> None:
    """Stops the per-step API's (PT) worker thread, if one was started."""
    if self.pt is not None:
      self.pt.close()


def check_common(num_examples: int, batch_size: int, floor: float) -> None:
  """One clear error for a bad n, m or floor ε (every factory's arguments)."""
  if num_examples < 1:
    raise ValueError(f"the dataset must have n ≥ 1 examples; got {num_examples}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be ≥ 1; got {batch_size}.")
  if not 0.0 < floor <= 1.0:
    raise ValueError(
        f"floor must lie in (0, 1]: every p_i needs a uniform floor ε/n > 0 "
        f"for the importance weights to stay unbiased; got {floor}.")


@struct.dataclass
class UniformState(struct.PyTreeNode):
  """U-SGD keeps no per-example state."""


def _uniform_draw(num_examples: int, state: UniformState, key: chex.PRNGKey,
                  shape: tuple[int, ...]) -> Sample:
  del state
  idx = jax.random.randint(key, shape, 0, num_examples, jnp.int32)
  return Sample(indices=idx, probs=jnp.full(shape, 1.0 / num_examples),
                weights=jnp.ones(shape))


def _nothing_to_fold(state: PyTree, drawn: Any, measured: Any) -> PyTree:
  del drawn, measured
  return state


def uniform_sampler(num_examples: int, *, batch_size: int) -> Sampler:
  """Plain uniform sampling with replacement and gain ratio 1 (U-SGD).

  It draws with ``jax.random.randint``, keeps no state, and measures
  nothing.
  """
  check_common(num_examples, batch_size, 1.0)
  n = num_examples
  return Sampler(
      name="uniform", num_examples=n, batch_size=batch_size,
      feature_names=("constant",), init=UniformState,
      draw=functools.partial(_uniform_draw, n), fold_in=_nothing_to_fold,
      probabilities=functools.partial(_uniform_probabilities, n))


def _uniform_probabilities(num_examples: int, state: UniformState) -> chex.Array:
  del state
  return jnp.full((num_examples,), 1.0 / num_examples, jnp.float32)
