"""Small Flax NNX models for the examples, the compare CLI and benchmarks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
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


class Flatten(nnx.Module):
  """Applies ``module`` to the inputs flattened to (m, features)."""

  def __init__(self, module: nnx.Module):
    self.module = module

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.module(x.reshape(x.shape[0], -1))


class CNN(nnx.Module):
  """Two stride-2 convolutions, global average pooling, a dense classifier.

  One example's ``input_shape`` is (L,) for a signal (1-D convolutions),
  (H, W) for a grey image or (H, W, C) for an image with channels.
  """

  def __init__(self, input_shape: Sequence[int], out_features: int, *,
               channels: Sequence[int] = (16, 32), rngs: nnx.Rngs):
    if len(input_shape) not in (1, 2, 3):
      raise ValueError(f"CNN takes inputs shaped (L,), (H, W) or (H, W, C); "
                       f"got {tuple(input_shape)}.")
    spatial = min(len(input_shape), 2)
    self.spatial = spatial
    in_channels = input_shape[2] if len(input_shape) == 3 else 1
    sizes = [in_channels, *channels]
    self.convs = nnx.List([
        nnx.Conv(a, b, (3,) * spatial, strides=2, padding="SAME", rngs=rngs)
        for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == self.spatial + 1:
      x = x[..., None]  # add the channel axis
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.out(x.mean(axis=tuple(range(1, 1 + self.spatial))))


def make_model(name: str, input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (256, 256), rngs: nnx.Rngs) -> nnx.Module:
  """``"mlp"`` (inputs flattened) or ``"cnn"`` for inputs of ``input_shape``
  (one example's shape)."""
  if name == "mlp":
    return Flatten(MLP(math.prod(input_shape), hidden, num_classes, rngs=rngs))
  if name == "cnn":
    return CNN(input_shape, num_classes, rngs=rngs)
  raise ValueError(f"unknown model {name!r}; use mlp or cnn.")


def functional(module: nnx.Module, input_key: str = "x"):
  """Splits an NNX module into (model_fn(params, batch), params).

  ``model_fn`` is pure: it merges the graph definition with ``params`` (the
  ``nnx.Param`` variables, which are trained) and the module's other state
  (e.g. BatchNorm's running statistics, RNG counts), which it holds constant,
  and applies the module to ``batch[input_key]``. Normalising by statistics
  of the batch would couple the examples of a batch, so their per-example
  gradient norms would not be defined: use BatchNorm with
  ``use_running_average=True`` (or LayerNorm / GroupNorm) with RAIS.
  """
  graphdef, params, *rest = nnx.split(module, nnx.Param, ...)

  def model_fn(p: Any, batch: Any) -> jax.Array:
    return nnx.merge(graphdef, p, *rest)(batch[input_key])

  return model_fn, params
