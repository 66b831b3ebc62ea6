"""(PT) solves outside the training program, on one device and a worker thread.

The fast path (:mod:`rais_jax.runner`) hands each (PT) snapshot to a
:class:`SolveService` between two blocks of steps: it reads the snapshot to
the host (:meth:`SolveService.read`, in the same read as anything else the
host needs then), and ``submit_host`` copies it to the solve device and runs
the jitted solver there on one worker thread (``submit`` does both for a
snapshot still on device). The CPU client runs a computation on the thread
that calls it, so the host thread stays free to dispatch training blocks
meanwhile. ``take``
hands the result to the block that applies it, waiting only if the solve is
not finished by then. No callback runs inside the training program, so
nothing there waits for a solve: this is what lets asynchronous (PT) run
beside a multi-device (SPMD) program. The thread starts with the first
submission; :meth:`SolveService.close` stops it.

The solve device defaults to the host's first CPU device: on an accelerator the
solve then overlaps with training instead of queueing behind it, and it never
needs the devices a mesh holds. ``wait=True`` (``pt_mode="sync"``) blocks at
submission; since the same compiled solver runs on the same device on the same
snapshot, sync and async runs are bit-identical on every backend.

Results are keyed by their due step and a fingerprint of the snapshot (the
sums of its norms' and probabilities' bit patterns), so a run resumed from a checkpoint,
or any state the service has not seen, is solved afresh instead of receiving
another run's result.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import threading
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rais_jax.pt import solver as pt_solver
from rais_jax.pt.snapshot import PendingSolve


def solve(*args, max_iters: int):
  """(c, d, PTInfo) from a snapshot's ``solve_args()``."""
  features, norms, probs, feature_sum, c, d = args
  return pt_solver.solve_pt(features, norms, probs, feature_sum, init=(c, d),
                            max_iters=max_iters)


_SOLVE_PT = pt_solver.solve_pt  # for shapes only: never a patched stand-in


@functools.lru_cache(maxsize=None)
def result_shapes(num_records: int, num_features: int) -> tuple:
  """Shapes and dtypes of a solve's (c, d, PTInfo), derived from the solver."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  vec = f32(num_features)
  return jax.eval_shape(
      lambda f, v, p, s_, c, d: _SOLVE_PT(f, v, p, s_, init=(c, d), max_iters=1),
      f32(num_records, num_features), f32(num_records), f32(num_records), vec,
      vec, vec)


def failed_result(num_features: int) -> tuple:
  """What a solve that raised reports: NaN (c, d), ``ok`` False (counted as a
  failure; the previous (c, d) are kept)."""
  nan = np.full((num_features,), np.nan, np.float32)
  return (nan, nan.copy(), pt_solver.PTInfo(
      iterations=np.int32(0), converged=np.bool_(False),
      objective=np.float32(np.nan), constraint=np.float32(np.nan),
      step_norm=np.float32(np.nan), ok=np.bool_(False)))


def default_device() -> jax.Device:
  """The host's first CPU device, else the default device."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
    return jax.local_devices()[0]


def fingerprint(pending: PendingSolve) -> jax.Array:
  """(Σ bits of the norms, Σ bits of the probs, due) of a snapshot, computed
  on device: tells snapshots apart without copying them to the host.

  Sums of the float32 bit patterns as int32 (wrapping): exact, so every
  program that computes it (the block that takes the snapshot, or a later
  call) gets the same key, whatever its order of summation (a float sum
  rounds differently per program on a GPU).
  """
  bits = lambda x: jax.lax.bitcast_convert_type(
      x.astype(jnp.float32), jnp.int32).sum(dtype=jnp.int32)
  return jnp.stack([bits(pending.norms), bits(pending.probs),
                    pending.due.astype(jnp.int32)])


def local(x: jax.Array) -> jax.Array:
  """This process's copy of a replicated array (multi-host arrays are global)."""
  return x if x.is_fully_addressable else x.addressable_data(0)


class SolveService:
  """Dispatches (PT) solves to ``device`` and keeps their results until taken."""

  def __init__(self, *, max_iters: int, device: Optional[jax.Device] = None,
               wait: bool = False):
    self.device = default_device() if device is None else device
    self.wait = wait
    self._solve = jax.jit(functools.partial(solve, max_iters=max_iters))
    self._results: dict[tuple, concurrent.futures.Future] = {}
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

  @staticmethod
  def read(fingerprint_: jax.Array, pending: PendingSolve, *more: jax.Array
           ) -> tuple[tuple, list[np.ndarray], list[np.ndarray]]:
    """(key, solve arguments, ``more``) copied to the host in one read; the
    key is the :func:`fingerprint` ``fingerprint_`` of ``pending``.

    A copy through host memory, never an alias: the next programs donate
    the state's buffers (over a 4-device mesh, device_put(...,
    may_alias=False) of a replicated array still handed the solve a buffer
    that the next block then deleted). One ``device_get`` for everything:
    each separate host read costs a wait of its own and slows the next
    dispatch.
    """
    args = pending.solve_args()
    fp, *host = jax.device_get([local(a) for a in (fingerprint_, *args, *more)])
    return tuple(int(v) for v in fp), host[:len(args)], host[len(args):]

  def submit(self, pending: PendingSolve) -> tuple:
    """Starts solving ``pending`` (no-op if already in flight); returns its
    key. One host read of the snapshot."""
    key, args, _ = self.read(fingerprint(pending), pending)
    self.submit_host(key, args)
    return key

  def submit_host(self, key: tuple, args: list[np.ndarray]) -> None:
    """Starts solving a snapshot's solve arguments, already on the host, under
    ``key`` (no-op if a solve with that key is in flight)."""
    if key in self._results:
      return
    args = jax.device_put(args, self.device)  # one put for all six: half the time
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="rais-pt")
    d_r = args[0].shape[1]

    def run():
      try:
        return jax.block_until_ready(self._solve(*args))
      except Exception:  # pylint: disable=broad-except
        return failed_result(d_r)  # counted as a failed solve when applied

    future = self._executor.submit(run)
    if self.wait:
      future.result()
    self._results[key] = future

  def take(self, key: tuple, like: tuple) -> tuple:
    """The result for ``key`` placed like ``like`` (the state's c and d)."""
    c, d, info = self._results.pop(key).result()
    scalar = like[0].sharding
    return jax.device_put((c, d, info), (like[0].sharding, like[1].sharding,
                                         jax.tree.map(lambda _: scalar, info)))

  def __contains__(self, key: tuple) -> bool:
    return key in self._results

  def close(self) -> None:
    """Drops every result not yet taken and stops the worker thread."""
    self._results.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  def __enter__(self) -> "SolveService":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class CallbackSolves:
  """The per-step path's service: (PT) solves for ``io_callback`` calls.

  ``submit`` and ``fetch`` are called from inside the training program with
  the snapshot as NumPy arrays; solves run on a worker thread on the host CPU
  device (on an accelerator a solve would otherwise queue behind the running
  train step, which may be the one waiting for it). Results are keyed by a
  digest of the snapshot, so two runs that share a sampler never read each
  other's results, and a fetch with no matching submission (e.g. after
  restoring a checkpoint in a new process) solves on the spot. The worker
  thread starts with the first submission; :meth:`close` stops it.
  """

  _MAX_IN_FLIGHT = 16

  def __init__(self, solve_fn: Callable[..., tuple]):
    self._solve = solve_fn
    self._device = default_device()
    self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._futures: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  @staticmethod
  def _key(args) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in args:
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

  def _safe_solve(self, *args):
    try:
      out = self._solve(*jax.device_put(args, self._device))
      return jax.tree.map(np.asarray, out)
    except Exception:  # pylint: disable=broad-except
      return failed_result(args[0].shape[1])

  def submit(self, *args) -> np.ndarray:
    args = tuple(np.asarray(a) for a in args)
    key = self._key(args)
    with self._lock:
      if self._executor is None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="rais-pt")
      if key not in self._futures:
        self._futures[key] = self._executor.submit(self._safe_solve, *args)
      while len(self._futures) > self._MAX_IN_FLIGHT:
        self._futures.popitem(last=False)
    return np.zeros((), np.int32)

  def fetch(self, *args):
    args = tuple(np.asarray(a) for a in args)
    with self._lock:
      future = self._futures.pop(self._key(args), None)
    return future.result() if future is not None else self._safe_solve(*args)

  def close(self) -> None:
    """Drops results not yet fetched (re-solved if needed) and stops the thread."""
    with self._lock:
      self._futures.clear()
      executor, self._executor = self._executor, None
    if executor is not None:
      executor.shutdown(wait=True)
