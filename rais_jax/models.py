"""Small Flax NNX models for the examples and benchmarks."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
  """Dense → ReLU stack → logits."""

  def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
               *, rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)


def functional(module: nnx.Module, input_key: str = "x"):
  """Splits an NNX module into (model_fn(params, batch), params).

  ``model_fn`` is pure: it merges the graph definition with ``params`` and
  applies the module to ``batch[input_key]``.
  """
  graphdef, params = nnx.split(module, nnx.Param)

  def model_fn(p: Any, batch: Any) -> jax.Array:
    return nnx.merge(graphdef, p)(batch[input_key])

  return model_fn, params
