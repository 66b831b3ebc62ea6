"""Scatters whose result does not depend on the order of writes.

A block of K·m draws with replacement holds repeated examples, each with its
own measurement. ``x.at[idx].set(v)`` keeps one of a repeated index's values,
but which one is unspecified: the CPU keeps the last, a GPU whichever write
lands last, which changes from run to run. So the fold-ins write through
:func:`last_valid`, which keeps each index's last valid value by routing every
other write out of range (dropped): a run is then the same on every backend and
on every repetition.
"""

from __future__ import annotations

import chex
import jax.numpy as jnp

# Above this many slots per write, the O(size) scratch of the scatter-max
# costs more than sorting the writes (O(N log N), N = indices.size).
_SLOTS_PER_WRITE = 64


def last_valid(indices: chex.Array, valid: chex.Array, size: int) -> chex.Array:
  """``indices`` (N,) with every write but each index's last valid one
  replaced by ``size`` (out of range: pass ``mode="drop"`` to the scatter).

  Example: ``x.at[last_valid(idx, valid, n)].set(v, mode="drop")`` sets
  ``x[i]`` to the value of the last valid position holding ``i``, and leaves
  indices without a valid write unchanged. Exact integer work (a scatter-max
  of positions, whose order does not matter, or a stable sort for large
  ``size``), so deterministic on every backend.
  """
  chex.assert_rank([indices, valid], 1)
  n = indices.shape[0]
  position = jnp.arange(n, dtype=jnp.int32)
  target = jnp.where(valid, indices, size)
  if size <= _SLOTS_PER_WRITE * n:
    last = jnp.full((size,), -1, jnp.int32).at[target].max(position, mode="drop")
    keep = valid & (last[jnp.minimum(indices, size - 1)] == position)
  else:
    order = jnp.argsort(target, stable=True)  # equal targets keep their order
    ordered = target[order]
    is_last = jnp.append(ordered[1:] != ordered[:-1], True)
    keep = valid & jnp.zeros((n,), bool).at[order].set(is_last, unique_indices=True)
  return jnp.where(keep, indices, size)
