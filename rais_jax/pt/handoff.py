"""The fast path's host side of (PT): snapshots to the solve service, results back.

Between two programs, :class:`HostHandoff` reads a snapshot the last program
took (in one host read with anything else the host needs then), gives it to
a :class:`~rais_jax.pt.service.SolveService` if it is a new one, and takes the
result due at a boundary. It also remembers what the last run returned (weak
references to the arrays its host-side values were read from), so that a run
continuing from that state reads nothing from the device at its start; a
state from elsewhere (a checkpoint) is read once, and its solve in flight, if
the service does not hold it, is submitted again.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from rais_jax.pt import service as pt_service
from rais_jax.pt.snapshot import PendingSolve

PyTree = Any
SolveKey = tuple  # (Σ norm bits, Σ prob bits, due): pt_service.fingerprint


def header(state: PyTree, with_pt: bool) -> chex.Array:
  """[step, skipped steps, (with ``with_pt``) the fingerprint of the pending
  snapshot]: what the host needs of a state it did not return, in one read."""
  head = jnp.stack([state.step, state.skipped_steps]).astype(jnp.int32)
  if not with_pt:
    return head
  return jnp.concatenate([head, pt_service.fingerprint(state.sampler.pending)])


class HostHandoff:
  """The host's view of a run, and its (PT) solves (``service`` None: none)."""

  def __init__(self, service: Optional[pt_service.SolveService]):
    self.service = service
    self._returned: Optional[tuple[tuple, tuple]] = None

  def _watched(self, state: PyTree) -> tuple:
    """The arrays :meth:`view`'s values are read from."""
    pending = (state.sampler.pending.norms, state.sampler.pending.probs,
               state.sampler.pending.due) if self.service is not None else ()
    return (state.step, state.skipped_steps, *pending)

  def view(self, state: PyTree, read_header: Callable[[PyTree], chex.Array]
           ) -> tuple[int, int, Optional[SolveKey]]:
    """(step, skipped steps, key of the (PT) solve in flight or None) of
    ``state``: remembered if ``state`` holds the arrays the last run returned,
    else read in one program (``read_header``, the jitted :func:`header`) and
    one host read. A solve in flight that the service does not hold
    (restored, or dropped by :meth:`close`) is submitted again."""
    watched = self._watched(state)
    last = self._returned
    if last is not None and all(r() is a for r, a in zip(last[0], watched)):
      step, skipped, in_flight = last[1]
    else:
      step, skipped, *fp = (int(v) for v in jax.device_get(
          pt_service.local(read_header(state))))
      in_flight = tuple(fp) if fp and fp[2] > step else None
    service = self.service
    if in_flight is not None and service is not None and in_flight not in service:
      service.submit(state.sampler.pending)
    return step, skipped, in_flight

  def remember(self, state: PyTree, step: int, skipped: int,
               in_flight: Optional[SolveKey]) -> None:
    """What a run returned: :meth:`view` of this state then reads nothing."""
    self._returned = (tuple(map(weakref.ref, self._watched(state))),
                      (step, skipped, in_flight))

  def hand_over(self, snapshot: PendingSolve, fingerprint: chex.Array, due: int,
                *more: chex.Array) -> tuple[Optional[SolveKey], list]:
    """Reads a snapshot (with ``more``, in the same host read) and gives it to
    the service if it is a new one, due at step ``due`` (D was full). Returns
    (its key or None, ``more`` on the host)."""
    service = self.service
    assert service is not None  # only runners with (PT) take snapshots
    key, args, host = service.read(fingerprint, snapshot, *more)
    if key[2] != due:
      return None, host
    service.submit_host(key, args)
    return key, host

  def take(self, key: SolveKey, like: tuple) -> tuple:
    """The result for ``key`` placed like ``like`` (the state's c and d)."""
    assert self.service is not None
    return self.service.take(key, like)

  def close(self) -> None:
    """Forgets the last run and drops (PT) results not yet applied."""
    self._returned = None
    if self.service is not None:
      self.service.close()
