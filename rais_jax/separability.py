"""The check that a per-example loss is separable: no example's loss reads another.

Per-example gradients, by ghost norms or by ``vmap``, trace the loss of one
example at a time: a loss that couples examples (BatchNorm in training mode,
normalisation by batch statistics) would get per-example "gradients" of a
different function, silently. :func:`check_separable` probes for that. The
probe is numerical: a coupling that no random input reveals goes undetected.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def random_like(rng: np.random.Generator, shape, dtype) -> np.ndarray:
  """Random values of ``shape`` and ``dtype`` (small integers for int and bool)."""
  if jnp.issubdtype(dtype, jnp.inexact):
    return (0.5 * rng.standard_normal(shape)).astype(dtype)
  if jnp.issubdtype(dtype, jnp.bool_):
    return rng.integers(0, 2, shape).astype(bool)
  return rng.integers(0, 2, shape).astype(dtype)


def _probe(loss_fn, params, batch):
  """(the other examples' losses before, after changing example 0), or None
  if ``loss_fn`` closes over traced values and cannot be evaluated here."""
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():
    p = jax.tree.map(lambda x: random_like(rng, x.shape, x.dtype), params)
    b = jax.tree.map(
        lambda x: random_like(rng, (3,) + x.shape[1:], x.dtype), batch)
    b2 = jax.tree.map(
        lambda x: np.concatenate(
            [random_like(rng, (1,) + x.shape[1:], x.dtype), x[1:]]), b)
    before, after = loss_fn(p, b), loss_fn(p, b2)
  if isinstance(before, jax.core.Tracer):
    return None  # loss_fn closes over traced values: it cannot be probed here
  return (np.asarray(before, np.float64)[1:], np.asarray(after, np.float64)[1:])


def _coupled(probe) -> bool:
  before, after = probe
  return not np.allclose(before, after, rtol=1e-5, atol=1e-6, equal_nan=True)


def is_separable(loss_fn: Callable[[PyTree, PyTree], chex.Array],
                 params: PyTree, batch: PyTree) -> Optional[bool]:
  """Whether the probe of :func:`check_separable` finds no coupling (None
  where ``loss_fn`` closes over traced values and cannot be probed)."""
  probe = _probe(loss_fn, params, batch)
  return None if probe is None else not _coupled(probe)


def check_separable(loss_fn: Callable[[PyTree, PyTree], chex.Array],
                    params: PyTree, batch: PyTree) -> None:
  """Refuses a loss in which one example's loss depends on another example.

  Evaluates ``loss_fn`` (at trace time, on random parameters and three random
  examples shaped like ``batch``'s) twice, changing only the first example;
  raises ``ValueError`` if the losses of the others change. A ``loss_fn`` that
  closes over values traced by an enclosing ``jit`` cannot be evaluated
  eagerly and is not checked.
  """
  probe = _probe(loss_fn, params, batch)
  if probe is not None and _coupled(probe):
    raise ValueError(
        "loss_fn couples examples: changing example 0 of a batch changed the "
        f"losses of the others ({probe[0]} -> {probe[1]}). Per-example gradients "
        "are undefined for such a loss (BatchNorm in training mode, "
        "normalisation by batch statistics, ...); use per-example "
        "normalisation (LayerNorm/GroupNorm) or BatchNorm in inference mode, "
        "or give the model as a rais_jax.StatefulModel, whose training loss "
        "may couple examples (rais_jax.model).")
