"""A GPU's default float32 matmul precision (TF32), emulated on CPU.

XLA:GPU on Ampere and later runs float32 dots and convolutions at the default
precision with TF32 inputs (10 of float32's 23 mantissa bits, ~5e-4 relative
error per product); XLA:CPU ignores the precision and computes in float32. So a
test can pass on CPU and fail on a GPU only because it compares matmul results
at float32 tolerances. ``pytest --emulate-tf32`` (see ``conftest.py``) lowers
every float32 dot and convolution whose precision is the default (or
``HIGH``) with its inputs rounded to TF32 first, so the suite shows on CPU
which checks a GPU would break. Dots at ``HIGHEST`` (the library's solver and
samplers, tests under the ``highest_precision`` fixture) are left exact, as a
GPU leaves them. Accumulation stays float32, as in a tensor core. This is an
approximation of the hardware, not a model of it: cuBLAS/cuDNN may also
reorder the sums.

Uses JAX's lowering registry (``jax._src``), so it may need updating with JAX;
those private modules are imported only when :func:`emulate_tf32` is entered
(``--emulate-tf32`` or ``tests/test_tf32.py``), so a JAX that moves them breaks
only those, not every run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

# float32 keeps 23 mantissa bits, TF32 10: round away the lowest 13.
_DROPPED_BITS = 13
_TF32 = (None, jax.lax.Precision.DEFAULT, jax.lax.Precision.HIGH)


def round_to_tf32(x: jax.Array) -> jax.Array:
  """float32 rounded to the nearest TF32 value (ties away from zero);
  NaN and ±inf unchanged."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  half, mask = 1 << (_DROPPED_BITS - 1), ~np.uint32((1 << _DROPPED_BITS) - 1)
  rounded = jax.lax.bitcast_convert_type((bits + half) & mask, jnp.float32)
  return jnp.where(jnp.isfinite(x), rounded, x)


def _at_tf32(precision) -> bool:
  if isinstance(precision, tuple):
    return all(p in _TF32 for p in precision)
  return precision in _TF32


def _rounding_rule(rule, mlir):
  round_lowered = mlir.lower_fun(round_to_tf32, multiple_results=False)

  def lower(ctx, lhs, rhs, **params):
    if _at_tf32(params.get("precision")):
      operands = []
      for value, aval in zip((lhs, rhs), ctx.avals_in):
        if aval.dtype == np.float32:
          (value,) = round_lowered(ctx.replace(avals_in=[aval], avals_out=[aval]),
                                   value)
        operands.append(value)
      lhs, rhs = operands
    return rule(ctx, lhs, rhs, **params)
  return lower


@contextlib.contextmanager
def emulate_tf32() -> Iterator[None]:
  """Within the block, CPU programs compile their default-precision float32
  dots and convolutions on TF32-rounded inputs (clears JAX's caches on entry
  and exit, so nothing compiled outside is reused inside or after)."""
  # pylint: disable=import-outside-toplevel
  from jax._src.interpreters import mlir
  from jax._src.lax import convolution as lax_convolution
  from jax._src.lax import lax as lax_internal
  cpu = mlir._platform_specific_lowerings["cpu"]  # pylint: disable=protected-access
  saved = {}
  for prim in (lax_internal.dot_general_p, lax_convolution.conv_general_dilated_p):
    entry = cpu.get(prim) or mlir._lowerings[prim]  # pylint: disable=protected-access
    saved[prim] = cpu.get(prim)
    cpu[prim] = mlir.LoweringRuleEntry(_rounding_rule(entry.rule, mlir), entry.inline)
  jax.clear_caches()
  try:
    yield
  finally:
    for prim, entry in saved.items():
      if entry is None:
        del cpu[prim]
      else:
        cpu[prim] = entry
    jax.clear_caches()
