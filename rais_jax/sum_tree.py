"""A sum-tree: O(log n) sampling proportional to n non-negative weights.

The tree is one flat array ``nodes`` of length ``2 * capacity`` (``capacity`` is the
smallest power of two ≥ n): node 1 is the root, node ``j`` has children ``2j`` and
``2j + 1``, and leaf ``i`` lives at ``capacity + i``. Padding leaves hold 0 and
``nodes[0]`` is unused. Every internal node is *recomputed* from its two children
(never incremented by deltas), so repeated updates cannot drift in floating point.

A :class:`SumTree` may hold a *stack* of trees over the same number of leaves
(``nodes`` of shape (T, 2 · capacity)); then one descent serves queries to any
of them, which halves the per-level cost of sampling from two trees.

All functions are pure and jit-able: the tree is a pytree whose only array is
``nodes``; ``num_leaves`` is static.

Costs: :func:`build` is O(n), :func:`update` and :func:`sample` are O(m log n)
for m leaves or draws.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SumTree:
  """Pytree holding a complete binary tree of partial sums."""

  nodes: chex.Array  # (2 * capacity,) or (T, 2 * capacity) float
  num_leaves: int = struct.field(pytree_node=False)

  @property
  def capacity(self) -> int:
    return self.nodes.shape[-1] // 2

  @property
  def depth(self) -> int:
    return self.capacity.bit_length() - 1


def _capacity(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def build(values: chex.Array) -> SumTree:
  """Builds a tree over ``values`` of shape (n,) (or a stack, (T, n)) in O(n).

  ``values`` must be non-negative.
  """
  chex.assert_rank(values, {1, 2})
  n = values.shape[-1]
  if n == 0:
    raise ValueError("A sum-tree needs at least one leaf; got an empty array.")
  cap = _capacity(n)
  lead = values.shape[:-1]
  level = jnp.zeros(lead + (cap,), values.dtype).at[..., :n].set(values)
  levels = [level]
  while level.shape[-1] > 1:
    level = level.reshape(lead + (-1, 2)).sum(axis=-1)
    levels.append(level)
  # levels[-1] is the root (node 1); prepend the unused node 0.
  nodes = jnp.concatenate([jnp.zeros(lead + (1,), values.dtype)] + levels[::-1],
                          axis=-1)
  return SumTree(nodes=nodes, num_leaves=n)


def total(tree: SumTree) -> chex.Array:
  """Sum of all leaves (the root); shape (T,) for a stack."""
  return tree.nodes[..., 1]


def leaves(tree: SumTree, indices: chex.Array) -> chex.Array:
  """Values of the leaves at ``indices``; shape (T, m) for a stack."""
  return tree.nodes[..., tree.capacity + indices]


def update(tree: SumTree, indices: chex.Array, values: chex.Array) -> SumTree:
  """Sets ``leaves[indices] = values`` and repairs their ancestors, O(m log n).

  ``values`` has shape (m,), or (T, m) for a stack. Repeated indices are
  allowed as long as they carry equal values (which one wins among unequal
  values is unspecified, as for any JAX scatter).
  """
  node = tree.capacity + indices
  nodes = tree.nodes.at[..., node].set(values.astype(tree.nodes.dtype))
  for _ in range(tree.depth):
    node = node // 2
    nodes = nodes.at[..., node].set(nodes[..., 2 * node] + nodes[..., 2 * node + 1])
  return tree.replace(nodes=nodes)


def descend(tree: SumTree, uniforms: chex.Array,
            which: Optional[chex.Array] = None) -> chex.Array:
  """Leaf indices drawn with probability leaf / total, from given randomness.

  At every level the descent goes right with probability right / (left +
  right), using a fresh uniform each level (``uniforms`` has shape
  (depth, ...)). Unlike a single inverse-CDF target u · total, whose float32
  grid (2⁻²³ · total) would distort the probabilities of small leaves once
  n ≳ 10⁶, each decision here is accurate to 2⁻²³ relative to its own node.
  Empty subtrees are never entered, so every draw is a leaf of positive weight
  (when the tree has any). For a stack, ``which`` (shape ``uniforms.shape[1:]``)
  names the tree each draw descends.
  """
  cap = tree.capacity
  chex.assert_axis_dimension(uniforms, 0, tree.depth)
  # Children (2j, 2j+1) are row j of the (…, cap, 2) view: one gather a level.
  pairs = tree.nodes.reshape(-1, 2)
  offset = 0 if which is None else which.astype(jnp.int32) * cap
  node = jnp.ones(uniforms.shape[1:], jnp.int32)
  for level in range(tree.depth):
    children = pairs[offset + node]
    left, right = children[..., 0], children[..., 1]
    go_right = ((uniforms[level] * (left + right) >= left) & (right > 0)) | (left <= 0)
    node = 2 * node + go_right.astype(jnp.int32)
  return jnp.minimum(node - cap, tree.num_leaves - 1)


def sample(tree: SumTree, key: chex.PRNGKey, shape: tuple[int, ...],
           which: Optional[chex.Array] = None) -> chex.Array:
  """Draws i.i.d. leaf indices with probability leaf / total, O(m log n)."""
  uniforms = jax.random.uniform(key, (tree.depth,) + tuple(shape),
                                dtype=tree.nodes.dtype)
  return descend(tree, uniforms, which)
