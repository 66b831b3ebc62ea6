import jax.numpy as jnp
import numpy as np
import pytest

from rais_jax import default_features, static_features


def test_default_features_values_and_update():
  fmap = default_features(np.array([0, 2, 1, 2]), 3)
  assert fmap.num_features == 6 and fmap.names[0] == "constant"
  state = fmap.init()
  f = fmap.compute(state, None)
  np.testing.assert_array_equal(f[1], [1, 0, 0, 1, 0, 1])
  state = fmap.update(state, jnp.array([1, 3]), jnp.array([2.5, jnp.nan]),
                      jnp.array([True, False]))
  f = fmap.compute(state, jnp.array([1, 3]))
  np.testing.assert_array_equal(f, [[1, 0, 0, 1, 2.5, 0], [1, 0, 0, 1, 0, 1]])


@pytest.mark.parametrize("labels, k, msg", [
    (np.array([0, 3]), 3, "range"),
    (np.array([-1, 0]), 3, "range"),
    (np.array([[0, 1]]), 3, "1-D"),
    (np.array([0.5, 1.0]), 3, "integers"),
])
def test_default_features_errors(labels, k, msg):
  with pytest.raises(ValueError, match=msg):
    default_features(labels, k)


def test_static_features():
  fmap = static_features(np.array([[1.0, 0.0], [2.0, 3.0]]), names=["x", "y"])
  np.testing.assert_array_equal(fmap.compute(fmap.init(), jnp.array([1])), [[2, 3]])
  with pytest.raises(ValueError, match="non-negative"):
    static_features(np.array([[-1.0]]))
