import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rais_jax import sum_tree
from stats_helpers import pooled_chisquare_pvalue


@pytest.mark.parametrize("n", [1, 2, 7, 8, 1000])
def test_build_total_and_leaves(n):
  values = np.random.default_rng(n).uniform(0, 1, n).astype(np.float32)
  tree = sum_tree.build(jnp.asarray(values))
  assert tree.capacity >= n and tree.capacity & (tree.capacity - 1) == 0
  np.testing.assert_allclose(sum_tree.total(tree), values.sum(), rtol=1e-5)
  np.testing.assert_array_equal(sum_tree.leaves(tree, jnp.arange(n)), values)


@pytest.mark.parametrize("update", [sum_tree.update, sum_tree.update_dense,
                                    sum_tree.update_many])
def test_update_with_duplicates_equals_rebuild(update):
  rng = np.random.default_rng(0)
  values = rng.uniform(0, 1, 37).astype(np.float32)
  tree = sum_tree.build(jnp.asarray(values))
  idx = np.array([3, 5, 3, 36, 0, 5])
  new = rng.uniform(0, 1, 37).astype(np.float32)
  values[idx] = new[idx]
  updated = jax.jit(update)(tree, jnp.asarray(idx), jnp.asarray(new[idx]))
  np.testing.assert_allclose(updated.nodes, sum_tree.build(jnp.asarray(values)).nodes,
                             rtol=1e-6)


def test_descend_never_enters_empty_subtrees():
  tree = sum_tree.build(jnp.array([0.0, 1.0, 0.0, 2.0, 0.0]))
  depth = tree.depth
  extremes = jnp.stack([jnp.zeros(depth), jnp.full(depth, 1 - 2**-24),
                        jnp.full(depth, 0.5)], axis=1)
  assert set(np.asarray(sum_tree.descend(tree, extremes)).tolist()) <= {1, 3}


def _descend_reference(nodes, offsets, branching, depth, num_leaves, u):
  """One draw, level by level in float32: the child is the number of prefix
  sums (added left to right) ≤ u · (their total), at most the last
  non-empty child."""
  node = 0
  for level in range(depth):
    first = offsets[level + 1] + node * branching
    children = nodes[first:first + branching]
    prefix, total = [], np.float32(0)
    for c in children:
      total = np.float32(total + c)
      prefix.append(total)
    target = np.float32(u[level]) * total
    choice = sum(p <= target for p in prefix)
    last_nonempty = max(j for j in range(branching) if children[j] > 0)
    node = node * branching + min(choice, last_nonempty)
  return min(node, num_leaves - 1)


def test_descend_matches_a_level_by_level_reference():
  rng = np.random.default_rng(3)
  values = rng.uniform(0, 1, 300) * (rng.uniform(size=300) < 0.6)
  values[:9] = values[-9:] = 0  # empty first and last children on every level
  tree = sum_tree.build(jnp.asarray(values, jnp.float32))
  u = rng.uniform(size=(tree.depth, 500)).astype(np.float32)
  u[:, :3] = [[0.0], [1 - 2**-24], [0.5]]  # the ends of [0, 1) included
  nodes = np.asarray(tree.nodes)
  offsets = [tree.offset(level) for level in range(tree.depth + 1)]
  expected = [_descend_reference(nodes, offsets, tree.branching, tree.depth,
                                 tree.num_leaves, u[:, j]) for j in range(u.shape[1])]
  np.testing.assert_array_equal(jax.jit(sum_tree.descend)(tree, jnp.asarray(u)),
                                expected)


def test_single_leaf():
  tree = sum_tree.build(jnp.array([2.0]))
  np.testing.assert_array_equal(sum_tree.sample(tree, jax.random.key(0), (4,)), 0)


def test_stacked_trees_sample_each_distribution():
  values = jnp.array([[1.0, 0.0, 3.0], [0.0, 5.0, 0.0]])
  stack = sum_tree.build(values)
  np.testing.assert_allclose(sum_tree.total(stack), [4.0, 5.0])
  which = jnp.arange(20_000) % 2
  idx = np.asarray(sum_tree.sample(stack, jax.random.key(0), (20_000,), which))
  assert set(idx[1::2].tolist()) == {1}
  frac = np.mean(idx[::2] == 2)
  # Binomial(10⁴, 0.75): sd 0.0043, so ±0.02 is > 4.5 sd.
  assert abs(frac - 0.75) < 0.02
  updated = sum_tree.update(stack, jnp.array([1]), jnp.array([[2.0], [1.0]]))
  np.testing.assert_allclose(sum_tree.total(updated), [6.0, 1.0])


def test_sampling_frequencies_chi_square():
  n, draws = 1000, 400_000
  rng = np.random.default_rng(1)
  weights = rng.gamma(0.5, 1.0, n).astype(np.float32)
  weights[:50] = 0.0  # never sampled
  tree = sum_tree.build(jnp.asarray(weights))
  idx = jax.jit(sum_tree.sample, static_argnums=2)(tree, jax.random.key(0), (draws,))
  counts = np.bincount(np.asarray(idx), minlength=n)
  assert counts[:50].sum() == 0
  p = weights / weights.sum()
  # The seed is fixed; see the helper for why 1e-3.
  assert pooled_chisquare_pvalue(counts, p * draws) > 1e-3


def test_build_rejects_empty():
  with pytest.raises(ValueError, match="at least one leaf"):
    sum_tree.build(jnp.zeros((0,)))


def test_dense_update_of_a_stack():
  """The block path's form: many leaves of a stack of trees at once."""
  rng = np.random.default_rng(1)
  values = rng.uniform(0, 1, (3, 600)).astype(np.float32)
  tree = sum_tree.build(jnp.asarray(values))
  idx = rng.integers(0, 600, 500)
  new = rng.uniform(0, 1, (3, 600)).astype(np.float32)
  values[:, idx] = new[:, idx]
  dense = sum_tree.update_dense(tree, jnp.asarray(idx), jnp.asarray(new[:, idx]))
  np.testing.assert_allclose(dense.nodes, sum_tree.build(jnp.asarray(values)).nodes,
                             rtol=1e-5)
