"""When (PT) runs: every period, on a snapshot of D, applied a fixed delay later.

:class:`PeriodicSolve` is a sampler's (PT) schedule and hooks, built once by
its factory (:func:`periodic_solve`): the period P = ⌈|D|/m⌉ steps (one refill
of D), the delay from a snapshot to its application, the solver's iteration
cap and how the per-step API hands solves off. Both drivers read it:

* the fast path (:func:`rais_jax.make_runner`) runs whole blocks of K steps,
  so it rounds both up to blocks (:meth:`PeriodicSolve.in_blocks`) and hands
  each snapshot to a :class:`rais_jax.pt.service.SolveService` between blocks
  (:class:`rais_jax.pt.handoff.HostHandoff`);
* the per-step API (:func:`rais_jax.make_train_step`) calls :func:`advance`
  after every step: a ``lax.cond`` at the delivery and the snapshot steps,
  with the solve in-graph (``mode="sync"``) or on a host thread through
  ``io_callback`` (``"async"``). Both give identical runs.

A solve that fails or returns non-finite values keeps the old (c, d) and is
counted in the diagnostics.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from rais_jax import records as records_lib
from rais_jax import schedule
from rais_jax.features import FeatureMap
from rais_jax.pt import service as pt_service
from rais_jax.pt import snapshot

PyTree = Any


class PeriodicSolve(NamedTuple):
  """A sampler's (PT) schedule (in steps) and its bound snapshot hooks."""

  period: int
  delay: int
  max_iters: int
  mode: str  # "async" or "sync"
  take: Callable[[PyTree, chex.Array], PyTree]  # (state, due) -> state
  take_if_full: Callable[[PyTree, chex.Array], PyTree]
  deliver: Callable[[PyTree, tuple], PyTree]  # (state, (c, d, info)) -> state
  callbacks: Optional[pt_service.CallbackSolves]  # the per-step async solves
  num_records: int
  num_features: int

  def in_blocks(self, block_size: int) -> tuple[int, int]:
    """(period, delay) rounded up to whole blocks of K steps: P = K ⌈P/K⌉, the
    delay a whole number of blocks, at most one period."""
    period = schedule.in_blocks(self.period, block_size)
    return period, min(schedule.in_blocks(self.delay, block_size), period)

  def solve(self, pending: snapshot.PendingSolve) -> tuple:
    """(c, d, info) of ``pending``, in-graph."""
    return pt_service.solve(*pending.solve_args(), max_iters=self.max_iters)

  def close(self) -> None:
    if self.callbacks is not None:
      self.callbacks.close()


def periodic_solve(feature_map: FeatureMap, set_parameters: Callable[..., PyTree], *,
                   buffer_size: int, batch_size: int, period: Optional[int],
                   delay: Optional[int], mode: str, max_iters: int) -> PeriodicSolve:
  """The (PT) schedule, checked: period default ⌈|D|/m⌉, delay default the
  period (a whole period of training for an asynchronous solve to finish)."""
  period = -(-buffer_size // batch_size) if period is None else period
  if period < 1:
    raise ValueError(f"pt_period must be ≥ 1; got {period}.")
  if period * batch_size < buffer_size:
    raise ValueError(
        f"pt_period ({period}) × batch_size ({batch_size}) must be ≥ "
        f"buffer_size ({buffer_size}) so that D is full at each solve.")
  delay = period if delay is None else delay
  if not 1 <= delay <= period:
    raise ValueError(f"pt_delay must lie in [1, pt_period={period}]; got {delay}.")
  if mode not in ("async", "sync"):
    raise ValueError(f"pt_mode must be 'async' or 'sync'; got {mode!r}.")
  callbacks = None
  if mode == "async":
    callbacks = pt_service.CallbackSolves(jax.jit(functools.partial(
        pt_service.solve, max_iters=max_iters)))
  return PeriodicSolve(
      period=period, delay=delay, max_iters=max_iters, mode=mode,
      take=functools.partial(snapshot.take, feature_map),
      take_if_full=functools.partial(snapshot.take_if_full, feature_map),
      deliver=functools.partial(snapshot.deliver, set_parameters),
      callbacks=callbacks, num_records=buffer_size,
      num_features=feature_map.num_features)


def advance(pt: PeriodicSolve, state: PyTree, step: chex.Array) -> PyTree:
  """The per-step hand-off after step ``step`` (counted from 1): deliver the
  solve due now, then snapshot D at a period boundary if D is full."""

  def deliver(state):
    args = state.pending.solve_args()
    if pt.callbacks is not None:
      solved = io_callback(pt.callbacks.fetch,
                           pt_service.result_shapes(pt.num_records, pt.num_features),
                           *args)
    else:
      solved = pt_service.solve(*args, max_iters=pt.max_iters)
    return pt.deliver(state, solved)

  def take(state):
    state = pt.take(state, step + pt.delay)
    if pt.callbacks is not None:
      pending = state.pending
      token = io_callback(pt.callbacks.submit, jax.ShapeDtypeStruct((), jnp.int32),
                          *pending.solve_args())
      # Tie the callback into the state so it is never dead-code eliminated.
      state = state.replace(pending=pending.replace(due=pending.due + token))
    return state

  state = jax.lax.cond(state.pending.due == step, deliver, lambda s: s, state)
  # Skipped measurements (non-finite norms) can leave D short of full at a
  # period boundary; then wait for the next one rather than solve on empty
  # slots.
  due = (step % pt.period == 0) & records_lib.is_full(state.records)
  return jax.lax.cond(due, take, lambda s: s, state)
