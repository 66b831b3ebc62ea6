import os

# Tests run on CPU, in float32, deterministically.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest


@pytest.fixture
def highest_precision():
  """Full float32 matmuls for tests that check exactness: GPUs default to
  TF32 (10-bit mantissa), which is not what those tests are about. Each
  module that uses it keeps a looser check at the default precision."""
  with jax.default_matmul_precision("highest"):
    yield
