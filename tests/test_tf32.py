"""The TF32 emulation the suite can run under (``pytest --emulate-tf32``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tf32


def test_round_to_tf32_keeps_ten_mantissa_bits():
  x = jnp.array([1.0, 1 + 2**-11, 1 + 2**-10 + 2**-12, 1 + 2**-12, -3.3, 0.0,
                 jnp.nan, jnp.inf, -jnp.inf], jnp.float32)
  out = np.asarray(tf32.round_to_tf32(x))
  np.testing.assert_array_equal(
      out[:6], np.float32([1.0, 1 + 2**-10, 1 + 2**-10, 1.0, -3.30078125, 0.0]))
  assert np.isnan(out[6]) and out[7] == np.inf and out[8] == -np.inf
  # Every rounded value is a TF32 value: its low 13 mantissa bits are zero.
  y = tf32.round_to_tf32(jax.random.normal(jax.random.key(0), (1000,)) * 1e3)
  assert not np.any(np.asarray(jax.lax.bitcast_convert_type(y, jnp.uint32)) & 0x1FFF)


def test_default_precision_dots_and_convolutions_round_inside_only(request):
  if request.config.getoption("--emulate-tf32"):
    pytest.skip("compares with exact dots outside the emulation")
  if jax.default_backend() != "cpu":  # (failed on the H200: dots there are not CPU's)
    pytest.skip("the emulation replaces the CPU lowering rules; a GPU runs TF32 itself")
  a, b = (jax.random.normal(jax.random.key(i), (128, 128)) for i in (1, 2))
  img = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(4), (3, 3, 3, 4))
  conv = lambda i, k: jax.lax.conv_general_dilated(
      i, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  dot = jax.jit(jnp.matmul)
  exact_dot, exact_conv = np.asarray(dot(a, b)), np.asarray(conv(img, kernel))
  rounded = lambda v: np.asarray(tf32.round_to_tf32(v), np.float64)
  with tf32.emulate_tf32():
    emulated = np.asarray(dot(a, b))
    emulated_conv = np.asarray(conv(img, kernel))
    with jax.default_matmul_precision("highest"):
      highest = np.asarray(dot(a, b))
  # The emulated dot is the float64 product of the rounded inputs (up to
  # float32 accumulation), ~1e-3 away from the float32 one.
  np.testing.assert_allclose(emulated, rounded(a) @ rounded(b), rtol=1e-5, atol=1e-4)
  assert 1e-4 < np.abs(emulated - exact_dot).max() / np.abs(exact_dot).max() < 1e-2
  assert 0 < np.abs(emulated_conv - exact_conv).max()
  np.testing.assert_array_equal(highest, exact_dot)
  np.testing.assert_array_equal(np.asarray(dot(a, b)), exact_dot)  # restored


def test_emulation_is_active_when_asked(request):
  """Positive control of ``--emulate-tf32`` (the test above skips under it):
  with the option, a default-precision dot is the product of TF32-rounded
  inputs; without it, this test has nothing to check."""
  if not request.config.getoption("--emulate-tf32"):
    pytest.skip("run with --emulate-tf32")
  a, b = (jax.random.normal(jax.random.key(i), (64, 64)) for i in (5, 6))
  got = np.asarray(jax.jit(jnp.matmul)(a, b))
  rounded = lambda v: np.asarray(tf32.round_to_tf32(v), np.float64)
  np.testing.assert_allclose(got, rounded(a) @ rounded(b), rtol=1e-5, atol=1e-4)
  assert np.abs(got - np.asarray(a, np.float64) @ np.asarray(b, np.float64)).max() > 1e-4
