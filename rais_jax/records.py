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
  """Appends the rows where ``valid``, in order, overwriting the oldest."""
  cap = records.capacity
  rank = jnp.cumsum(valid) - 1
  count = valid.sum(dtype=jnp.int32)
  # More valid rows than slots: only the last ``cap`` of them survive (two
  # rows written to one slot in one scatter would leave either).
  keep = valid & (rank >= count - cap)
  slot = jnp.where(keep, (records.position + rank) % cap, cap)  # cap: dropped
  put = lambda buf, x: buf.at[slot].set(x.astype(buf.dtype), mode="drop")
  return Records(features=put(records.features, features),
                 norms=put(records.norms, norms),
                 probs=put(records.probs, probs),
                 position=(records.position + count) % cap,
                 size=jnp.minimum(records.size + count, cap))


def is_full(records: Records) -> chex.Array:
  return records.size == records.capacity
