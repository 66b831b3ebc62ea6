import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rais_jax import scatter


def _reference(indices, values, valid, size, initial):
  """Row by row: each valid write overwrites the last."""
  out = initial.copy()
  for i, v, ok in zip(indices, values, valid):
    if ok:
      out[i] = v
  return out


# size 50 with 40 writes takes the scatter-max path; size 5000 the sort path.
@pytest.mark.parametrize("size", [50, 5000])
@pytest.mark.parametrize("seed", range(3))
def test_each_index_keeps_its_last_valid_write(size, seed):
  rng = np.random.default_rng(seed)
  # Few distinct indices, so that most are written several times.
  indices = rng.choice(rng.integers(0, size, 8), 40).astype(np.int32)
  values = rng.normal(size=40).astype(np.float32)
  valid = rng.random(40) < 0.7
  initial = np.full(size, -7.0, np.float32)
  writes = jax.jit(scatter.last_valid, static_argnums=2)(
      jnp.asarray(indices), jnp.asarray(valid), size)
  got = jnp.asarray(initial).at[writes].set(jnp.asarray(values), mode="drop")
  np.testing.assert_array_equal(got, _reference(indices, values, valid, size, initial))
  # Kept writes are unique, so no backend has a choice to make.
  kept = np.asarray(writes)[np.asarray(writes) < size]
  assert len(kept) == len(set(kept)) == len(set(indices[valid]))


def test_no_valid_write_leaves_everything_unchanged():
  writes = scatter.last_valid(jnp.array([1, 1, 2]), jnp.zeros(3, bool), 4)
  np.testing.assert_array_equal(writes, [4, 4, 4])
