"""The ring buffer D of recent measurements that (PT) learns from.

Each record j holds s̃_j (the example's features just before it was
measured), ṽ_j (its measured gradient norm) and p_j (the probability it was
drawn with). :func:`push` appends a batch of rows at once, skipping invalid
ones (non-finite norms) and overwriting the oldest rows once D is full; a batch
longer than D keeps its last ``|D|`` valid rows. Pure functions over a
:class:`Records` pytree, so they run under ``jit`` and ``lax.scan``.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp
from rais_jax import struct


@struct.dataclass
class Records(struct.PyTreeNode):
  """Ring buffer D of the last ``|D|`` measurements (s̃_j, ṽ_j, p_j)."""

  features: chex.Array  # (|D|, d_R)
  norms: chex.Array  # (|D|,)
  probs: chex.Array  # (|D|,)
  position: chex.Array  # int32, next slot to write
  size: chex.Array  # int32, number of slots written (≤ |D|)

  @property
  def capacity(self) -> int:
    return self.norms.shape[0]


def init(capacity: int, num_features: int) -> Records:
  """An empty buffer of ``capacity`` rows (every leaf its own buffer)."""
  return Records(features=jnp.zeros((capacity, num_features), jnp.float32),
                 norms=jnp.zeros((capacity,), jnp.float32),
                 probs=jnp.ones((capacity,), jnp.float32),
                 position=jnp.zeros((), jnp.int32),
                 size=jnp.zeros((), jnp.int32))


def push(records: Records, features: chex.Array, norms: chex.Array,
         probs: chex.Array, valid: chex.Array) -> Records:
  """Appends the rows where ``valid``, in order, overwriting the oldest.

  Written as a select over the ``|D|`` slots of rows gathered from the batch,
  not as a scatter of the batch's rows into their slots: inside a block's
  program XLA:CPU ran the scatter form as a slow serial loop (the CHANGELOG
  has the measurement), the select as one fused pass.
  """
  cap, n = records.capacity, valid.shape[0]
  rank = jnp.cumsum(valid, dtype=jnp.int32) - 1
  count = valid.sum(dtype=jnp.int32)
  # More valid rows than slots: only the last ``cap`` of them survive.
  first = jnp.maximum(count - cap, 0)
  width = min(n, cap)
  # source[k]: the batch row that is the k-th one kept (the order kept).
  source = jnp.zeros((width,), jnp.int32).at[
      jnp.where(valid & (rank >= first), rank - first, width)].set(
          jnp.arange(n, dtype=jnp.int32), mode="drop")
  # Kept row k goes where row-by-row pushes put it, slot (position + first
  # + k) mod cap: slot j receives kept row (j − position − first) mod cap.
  offset = (jnp.arange(cap, dtype=jnp.int32) - records.position - first) % cap
  written = offset < count - first
  row = source[jnp.minimum(offset, width - 1)]

  def put(buf: chex.Array, x: chex.Array) -> chex.Array:
    mask = written.reshape((cap,) + (1,) * (buf.ndim - 1))
    return jnp.where(mask, x.astype(buf.dtype)[row], buf)

  return Records(features=put(records.features, features),
                 norms=put(records.norms, norms),
                 probs=put(records.probs, probs),
                 position=(records.position + count) % cap,
                 size=jnp.minimum(records.size + count, cap))


def is_full(records: Records) -> chex.Array:
  return records.size == records.capacity
