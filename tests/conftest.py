import atexit
import contextlib
import os
import shutil
import tempfile

# Tests run on CPU, in float32, deterministically.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same programs (the same models, runners and
# samplers, built afresh per test): a persistent compilation cache, empty at
# the start of each session, lets XLA compile each once (test_runner.py:
# 117 s -> 71 s on 2 cores). Set in the environment so that the tests'
# subprocesses (examples, notebooks, multi-process) and pytest-xdist's
# workers (started from the controller's environment) share it.
_CACHE = tempfile.mkdtemp(prefix="rais-jax-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def highest_precision():
  """Full float32 matmuls for tests that check exactness: GPUs default to
  TF32 (10-bit mantissa), which is not what those tests are about. Each
  module that uses it keeps a looser check at the default precision."""
  with jax.default_matmul_precision("highest"):
    yield


def pytest_addoption(parser):
  parser.addoption(
      "--emulate-tf32", action="store_true",
      help="compile default-precision float32 dots and convolutions on "
           "TF32-rounded inputs, as a GPU runs them (tests/tf32.py): shows on "
           "CPU which checks a GPU's default precision would break. Not for "
           "tests that run subprocesses (examples, notebooks, multi-process).")


def pytest_configure(config):
  if config.getoption("--emulate-tf32"):
    import tf32  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    stack = contextlib.ExitStack()
    stack.enter_context(tf32.emulate_tf32())
    config.add_cleanup(stack.close)
