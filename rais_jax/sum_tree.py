"""A sum-tree: O(log n) sampling proportional to n non-negative weights.

The tree is one flat array ``nodes`` of length ``2 * capacity`` (``capacity`` is the
smallest power of two ≥ n): node 1 is the root, node ``j`` has children ``2j`` and
``2j + 1``, and leaf ``i`` lives at ``capacity + i``. Padding leaves hold 0 and
``nodes[0]`` is unused. Every internal node is *recomputed* from its two children
(never incremented by deltas), so repeated updates cannot drift in floating point.

All functions are pure and jit-able: the tree is a pytree whose only array is
``nodes``; ``num_leaves`` is static.

Costs: :func:`build` is O(n), :func:`update` and :func:`find` are O(m log n) for
m leaves or queries.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SumTree:
  """Pytree holding a complete binary tree of partial sums."""

  nodes: chex.Array  # (2 * capacity,) float
  num_leaves: int = struct.field(pytree_node=False)

  @property
  def capacity(self) -> int:
    return self.nodes.shape[0] // 2

  @property
  def depth(self) -> int:
    return self.capacity.bit_length() - 1


def _capacity(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def build(values: chex.Array) -> SumTree:
  """Builds a tree over ``values`` (shape (n,), non-negative) in O(n)."""
  chex.assert_rank(values, 1)
  n = values.shape[0]
  if n == 0:
    raise ValueError("A sum-tree needs at least one leaf; got an empty array.")
  cap = _capacity(n)
  level = jnp.zeros((cap,), values.dtype).at[:n].set(values)
  levels = [level]
  while level.shape[0] > 1:
    level = level.reshape(-1, 2).sum(axis=1)
    levels.append(level)
  # levels[-1] is the root (node 1); prepend the unused node 0.
  nodes = jnp.concatenate([jnp.zeros((1,), values.dtype)] + levels[::-1])
  return SumTree(nodes=nodes, num_leaves=n)


def total(tree: SumTree) -> chex.Array:
  """Sum of all leaves (the root)."""
  return tree.nodes[1]


def leaves(tree: SumTree, indices: chex.Array) -> chex.Array:
  """Values of the leaves at ``indices``."""
  return tree.nodes[tree.capacity + indices]


def update(tree: SumTree, indices: chex.Array, values: chex.Array) -> SumTree:
  """Sets ``leaves[indices] = values`` and repairs their ancestors, O(m log n).

  Repeated indices are allowed as long as they carry equal values (which one
  wins among unequal values is unspecified, as for any JAX scatter).
  """
  nodes = tree.nodes.at[tree.capacity + indices].set(values.astype(tree.nodes.dtype))
  node = tree.capacity + indices
  for _ in range(tree.depth):
    node = node // 2
    nodes = nodes.at[node].set(nodes[2 * node] + nodes[2 * node + 1])
  return tree.replace(nodes=nodes)


def find(tree: SumTree, targets: chex.Array) -> chex.Array:
  """Leaf index i with cumsum[i-1] ≤ target < cumsum[i], for each target.

  ``targets`` should lie in [0, total). Rounding can push a target past the
  mass of the subtree it descends into; the descent then never enters an
  empty subtree, so the result is always a leaf of positive weight (when the
  tree has any).
  """
  node = jnp.ones(targets.shape, jnp.int32)
  u = targets.astype(tree.nodes.dtype)
  for _ in range(tree.depth):
    left = tree.nodes[2 * node]
    right = tree.nodes[2 * node + 1]
    go_right = ((u >= left) & (right > 0)) | (left <= 0)
    u = jnp.where(go_right, u - left, u)
    node = 2 * node + go_right.astype(jnp.int32)
  return jnp.minimum(node - tree.capacity, tree.num_leaves - 1)


def sample(tree: SumTree, key: chex.PRNGKey, shape: tuple[int, ...]) -> chex.Array:
  """Draws i.i.d. leaf indices with probability leaf / total, O(m log n)."""
  u = jax.random.uniform(key, shape, dtype=tree.nodes.dtype) * total(tree)
  return find(tree, u)
