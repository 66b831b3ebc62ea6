"""The golden runs (tests/golden.py) are reproduced: a change that alters any
method's trajectory on the fast path or the per-step API shows here.

Bit-identical where they were recorded (CPU, the same JAX version); with
another JAX version on a CPU, compiled programs may round differently, so
there the check is to float32 noise over a few dozen steps. On another
backend (a GPU's TF32 matmuls and reduction orders) a draw can flip and the
runs part ways: the recording is a CPU artifact, so those tests skip there.
"""

import jax
import numpy as np
import pytest

import golden

_STORED = np.load(golden.GOLDEN)
_SAME_PLATFORM = (str(_STORED["jax_version"]) == jax.__version__
                  and str(_STORED["backend"]) == jax.default_backend())
pytestmark = pytest.mark.skipif(
    jax.default_backend() != str(_STORED["backend"]),
    reason="golden runs were recorded on " + str(_STORED["backend"]))


# Re-recorded (python tests/golden.py --record) when a change is meant to
# alter them; the CHANGELOG says which arrays moved and why.


def _check(prefix: str, got: dict[str, np.ndarray]) -> None:
  want = {k[len(prefix):]: _STORED[k] for k in _STORED.files if k.startswith(prefix)}
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    if _SAME_PLATFORM:
      np.testing.assert_array_equal(got[name], value, err_msg=prefix + name)
    else:
      np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6,
                                 err_msg=prefix + name)


@pytest.mark.parametrize("method", golden.FAST_METHODS)
def test_fast_path_reproduces_golden_run(method):
  _check(f"fast/{method}/", golden.fast_run(method))


@pytest.mark.parametrize("method", golden.PER_STEP_METHODS)
def test_per_step_api_reproduces_golden_run(method):
  _check(f"per_step/{method}/", golden.per_step_run(method))


def test_a_wrong_step_is_caught():
  """The comparison can fail: the golden RAIS run disagrees with U-SGD's."""
  with pytest.raises(AssertionError):
    _check("fast/rais/", {k[len("fast/usgd/"):]: _STORED[k] for k in _STORED.files
                          if k.startswith("fast/usgd/")})
