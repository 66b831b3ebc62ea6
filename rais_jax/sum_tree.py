"""A sum-tree: O(log n) sampling proportional to n non-negative weights.

The tree is B-ary (B = ``branching``, default 8) and complete: level ℓ has B^ℓ
nodes, the leaves are level ``depth`` (``capacity`` = B^depth ≥ n, padding
leaves hold 0), and node i of level ℓ has children B·i … B·i + B − 1 of level
ℓ + 1. The levels are stored root first in one flat array ``nodes``. Every
internal node is *recomputed* from its children (never incremented by deltas),
so repeated updates cannot drift in floating point. A wide tree has few levels
(6 instead of 17 for 10⁵ leaves), and each level is one small gather, so
sampling and updates are short chains of XLA ops.

A :class:`SumTree` may hold a *stack* of trees over the same number of leaves
(``nodes`` of shape (T, size)); then one descent serves draws from any of them.

All functions are pure and jit-able: the tree is a pytree whose only array is
``nodes``; ``num_leaves`` and ``branching`` are static.

Costs: :func:`build` is O(n), :func:`update` and :func:`sample` are O(m B log_B n)
for m leaves or draws.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
from rais_jax import struct


@struct.dataclass
class SumTree(struct.PyTreeNode):
  """Pytree holding a complete B-ary tree of partial sums, levels root first."""

  nodes: chex.Array  # (size,) or (T, size) float
  num_leaves: int = struct.field(pytree_node=False)
  branching: int = struct.field(pytree_node=False, default=8)

  @property
  def depth(self) -> int:
    """Number of levels below the root."""
    return _depth(self.num_leaves, self.branching)

  @property
  def capacity(self) -> int:
    return self.branching**self.depth

  def offset(self, level: int) -> int:
    """Index in ``nodes`` of the first node of ``level``."""
    return (self.branching**level - 1) // (self.branching - 1)


def _depth(n: int, branching: int) -> int:
  depth, cap = 0, 1
  while cap < n:
    depth, cap = depth + 1, cap * branching
  return depth


def _child_sums(groups: chex.Array) -> chex.Array:
  """(..., w, B) → (..., w): the sums of each group of B children.

  A matrix-vector product with ones rather than ``.sum(-1)``: XLA:CPU's
  reduction over a minor axis as short as B is much slower than a dot (the
  CHANGELOG has the measurement). Full float32 (GPUs would otherwise round
  through TF32). Every internal node is summed by this one function.
  """
  return jnp.matmul(groups, jnp.ones(groups.shape[-1:], groups.dtype),
                    precision=jax.lax.Precision.HIGHEST)


def build(values: chex.Array, *, branching: int = 8) -> SumTree:
  """Builds a tree over ``values`` of shape (n,) (or a stack, (T, n)) in O(n).

  ``values`` must be non-negative.
  """
  chex.assert_rank(values, {1, 2})
  n = values.shape[-1]
  if n == 0:
    raise ValueError("A sum-tree needs at least one leaf; got an empty array.")
  if branching < 2:
    raise ValueError(f"branching must be ≥ 2; got {branching}.")
  lead = values.shape[:-1]
  level = jnp.zeros(lead + (branching ** _depth(n, branching),), values.dtype)
  level = level.at[..., :n].set(values)
  levels = [level]
  while level.shape[-1] > 1:
    level = _child_sums(level.reshape(lead + (-1, branching)))
    levels.append(level)
  nodes = jnp.concatenate(levels[::-1], axis=-1)
  return SumTree(nodes=nodes, num_leaves=n, branching=branching)


def total(tree: SumTree) -> chex.Array:
  """Sum of all leaves (the root); shape (T,) for a stack."""
  return tree.nodes[..., 0]


def leaves(tree: SumTree, indices: chex.Array) -> chex.Array:
  """Values of the leaves at ``indices``; shape (T, m) for a stack."""
  return tree.nodes[..., tree.offset(tree.depth) + indices]


def update(tree: SumTree, indices: chex.Array, values: chex.Array) -> SumTree:
  """Sets ``leaves[indices] = values`` and repairs their ancestors.

  ``values`` has shape (m,), or (T, m) for a stack. Repeated indices are
  allowed as long as they carry equal values (which one wins among unequal
  values is unspecified, as for any JAX scatter).
  """
  b = tree.branching
  nodes = tree.nodes.at[..., tree.offset(tree.depth) + indices].set(
      values.astype(tree.nodes.dtype))
  node = indices
  for level in range(tree.depth - 1, -1, -1):
    node = node // b
    children = nodes[..., tree.offset(level + 1) + node[:, None] * b + jnp.arange(b)]
    nodes = nodes.at[..., tree.offset(level) + node].set(_child_sums(children))
  return tree.replace(nodes=nodes)


def descend(tree: SumTree, uniforms: chex.Array,
            which: Optional[chex.Array] = None) -> chex.Array:
  """Leaf indices drawn with probability leaf / total, from given randomness.

  At every level the descent picks child c with probability child_c / Σ
  children, using a fresh uniform each level (``uniforms`` has shape
  (depth, m)). Unlike a single inverse-CDF target u · total, whose float32
  grid (2⁻²³ · total) would distort the probabilities of small leaves once
  n ≳ 10⁶, each decision here is accurate to 2⁻²³ relative to its own node.
  Empty subtrees are never entered, so every draw is a leaf of positive weight
  (when the tree has any). For a stack, ``which`` (shape (m,)) names the tree
  each draw descends.
  """
  b = tree.branching
  chex.assert_axis_dimension(uniforms, 0, tree.depth)
  flat = tree.nodes.reshape(-1)
  base = 0 if which is None else which.astype(jnp.int32) * tree.nodes.shape[-1]
  node = jnp.zeros(uniforms.shape[1:], jnp.int32)
  child = jnp.arange(b)
  for level in range(tree.depth):
    first = tree.offset(level + 1) + node * b
    children = flat[(base + first)[..., None] + child]  # (m, B)
    # Prefix sums written out left to right: one fused loop instead of
    # XLA:CPU's cumsum (2x faster per level), and the same order of
    # additions on every backend.
    prefix = [children[..., 0]]
    for j in range(1, b):
      prefix.append(prefix[-1] + children[..., j])
    target = uniforms[level] * prefix[-1]
    choice = jnp.sum(jnp.stack(prefix, axis=-1) <= target[..., None], axis=-1)
    # Rounding can put the target at the very end: take the last non-empty child.
    last_nonempty = jnp.max(jnp.where(children > 0, child, 0), axis=-1)
    node = node * b + jnp.minimum(choice, last_nonempty).astype(jnp.int32)
  return jnp.minimum(node, tree.num_leaves - 1)


def sample(tree: SumTree, key: chex.PRNGKey, shape: tuple[int, ...],
           which: Optional[chex.Array] = None) -> chex.Array:
  """Draws i.i.d. leaf indices with probability leaf / total."""
  uniforms = jax.random.uniform(key, (tree.depth,) + tuple(shape),
                                dtype=tree.nodes.dtype)
  return descend(tree, uniforms, which)


def update_dense(tree: SumTree, indices: chex.Array, values: chex.Array) -> SumTree:
  """:func:`update` by re-summing every internal level: O(capacity), no gathers.

  The same tree as :func:`update`, cheaper when many leaves change at once
  (a block's K·m draws on a tree not much larger than that): one scatter of
  the leaves, then contiguous sums level by level.
  """
  b = tree.branching
  nodes = tree.nodes.at[..., tree.offset(tree.depth) + indices].set(
      values.astype(tree.nodes.dtype))
  # Each level re-summed into its slot of ``nodes``: updates in place (a
  # concatenation of the levels would copy the whole tree).
  for level in range(tree.depth - 1, -1, -1):
    width, below = b**level, tree.offset(level + 1)
    children = jax.lax.slice_in_dim(nodes, below, below + width * b, axis=-1)
    sums = _child_sums(children.reshape(children.shape[:-1] + (width, b)))
    nodes = jax.lax.dynamic_update_slice_in_dim(nodes, sums, tree.offset(level),
                                                axis=-1)
  return tree.replace(nodes=nodes)


def update_many(tree: SumTree, indices: chex.Array, values: chex.Array) -> SumTree:
  """:func:`update` or :func:`update_dense`, whichever is cheaper for this many
  leaves (measured on CPU: the dense form wins up to capacity ≈ 128 × leaves)."""
  if tree.capacity <= 128 * indices.size:
    return update_dense(tree, indices, values)
  return update(tree, indices, values)
