import jax
import jax.numpy as jnp
import numpy as np

from rais_jax import records


def _push(buf, rows, valid):
  rows = np.asarray(rows, np.float32)
  return records.push(buf, jnp.asarray(rows[:, None].repeat(2, 1)), jnp.asarray(rows),
                      jnp.asarray(rows + 100), jnp.asarray(valid))


def test_push_in_order_skipping_invalid_rows():
  buf = records.init(5, 2)
  buf = _push(buf, [1, 2, 3], [True, False, True])
  np.testing.assert_array_equal(buf.norms, [1, 3, 0, 0, 0])
  np.testing.assert_array_equal(buf.probs, [101, 103, 1, 1, 1])
  assert int(buf.position) == 2 and int(buf.size) == 2 and not bool(records.is_full(buf))
  buf = _push(buf, [4, 5, 6, 7], [True] * 4)  # wraps: overwrites the oldest
  np.testing.assert_array_equal(buf.norms, [7, 3, 4, 5, 6])
  np.testing.assert_array_equal(buf.features[:, 0], [7, 3, 4, 5, 6])
  assert int(buf.position) == 1 and int(buf.size) == 5 and bool(records.is_full(buf))


def test_push_more_rows_than_slots_keeps_the_last_ones():
  """A block's K·m rows can exceed |D|: the last |D| valid rows survive,
  each in the slot it would have reached row by row."""
  buf = _push(records.init(4, 2), [9], [True])
  rows = np.arange(1, 12)
  valid = rows != 10
  buf = _push(buf, rows, valid)
  row_by_row = _push(records.init(4, 2), [9], [True])
  for r, v in zip(rows, valid):
    row_by_row = _push(row_by_row, [r], [v])
  for a, b in zip((buf.features, buf.norms, buf.probs, buf.position, buf.size),
                  (row_by_row.features, row_by_row.norms, row_by_row.probs,
                   row_by_row.position, row_by_row.size)):
    np.testing.assert_array_equal(a, b)
  assert sorted(np.asarray(buf.norms)) == [7, 8, 9, 11]


def test_push_matches_row_by_row_pushes_on_random_batches():
  """Batches of random sizes (some longer than |D|) and validity, from any
  position: the same buffer as pushing their rows one at a time."""
  rng = np.random.default_rng(0)
  buf = row_by_row = records.init(7, 2)
  for _ in range(30):
    size = int(rng.integers(1, 12))
    rows = rng.normal(size=size).astype(np.float32)
    valid = rng.uniform(size=size) < 0.7
    buf = _push(buf, rows, valid)
    for r, v in zip(rows, valid):
      row_by_row = _push(row_by_row, [r], [v])
    for a, b in zip(jax.tree.leaves(buf), jax.tree.leaves(row_by_row)):
      np.testing.assert_array_equal(a, b)
