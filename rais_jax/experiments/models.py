"""Small Flax NNX models for the examples, the compare CLI and benchmarks,
and the adapters that turn an NNX module into rais-jax's model forms."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

import rais_jax as rj


class MLP(nnx.Module):
  """Dense → ReLU (→ dropout) stack → logits."""

  def __init__(self, in_features: int, hidden: Sequence[int], out_features: int,
               *, dropout: float = 0.0, rngs: nnx.Rngs):
    sizes = [in_features, *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])])
    self.out = nnx.Linear(sizes[-1], out_features, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
      if self.dropout is not None:
        x = self.dropout(x)
    return self.out(x)


class BatchNorm(nnx.Module):
  """Batch normalisation over all axes but the last (channels), as
  ``nnx.BatchNorm`` computes it, with the scale applied to the normalised
  input: y = γ·((x − μ_B)/√(σ²_B + ε)) + β. ``nnx.BatchNorm`` multiplies γ
  into 1/√(σ²_B + ε) first, a value with no row per example, so ghost norms
  could not split its gradient into per-example shares (see
  :mod:`rais_jax.model`); this order lets them. Running averages as
  ``nnx.BatchNorm``'s (``momentum`` 0.99 by default), used in inference
  (``use_running_average``, set by ``module.train()`` / ``module.eval()``).
  """

  def __init__(self, features: int, *, momentum: float = 0.99,
               epsilon: float = 1e-5, use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((features,)))
    self.bias = nnx.Param(jnp.zeros((features,)))
    self.mean = nnx.BatchStat(jnp.zeros((features,)))
    self.var = nnx.BatchStat(jnp.ones((features,)))
    self.momentum, self.epsilon = momentum, epsilon
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axes)
      var = jnp.maximum((x * x).mean(axes) - mean * mean, 0.0)
      mu = self.momentum
      self.mean[...] = mu * self.mean[...] + (1 - mu) * jax.lax.stop_gradient(mean)
      self.var[...] = mu * self.var[...] + (1 - mu) * jax.lax.stop_gradient(var)
    return self.scale[...] * ((x - mean) * jax.lax.rsqrt(var + self.epsilon)) + self.bias[...]


class PreActBlock(nnx.Module):
  """A pre-activation residual block (He et al., 2016): BN → ReLU → conv3×3
  (stride) → BN → ReLU (→ dropout) → conv3×3, plus the input (a 1×1
  convolution where the shape changes)."""

  def __init__(self, in_channels: int, channels: int, stride: int, *,
               dropout: float, rngs: nnx.Rngs):
    self.bn1, self.bn2 = BatchNorm(in_channels), BatchNorm(channels)
    self.conv1 = nnx.Conv(in_channels, channels, (3, 3), strides=stride,
                          padding="SAME", use_bias=False, rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), padding="SAME",
                          use_bias=False, rngs=rngs)
    self.shortcut = (nnx.Conv(in_channels, channels, (1, 1), strides=stride,
                              use_bias=False, rngs=rngs)
                     if stride != 1 or in_channels != channels else None)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.relu(self.bn1(x))
    skip = x if self.shortcut is None else self.shortcut(h)
    h = jax.nn.relu(self.bn2(self.conv1(h)))
    if self.dropout is not None:
      h = self.dropout(h)
    return skip + self.conv2(h)


class ResNet(nnx.Module):
  """A small pre-activation ResNet for (H, W) or (H, W, C) images: a 3×3
  stem (stride ``stem_stride``), stages of ``blocks`` :class:`PreActBlock`
  each (the first of every stage after the first halves H and W), BN → ReLU
  → global average pool → dense. The defaults (8/16/32 channels, one block
  per stage, a stride-2 stem: 28×28 → 14×14 → 7×7 → 4×4) are sized for a
  multi-seed Fashion-MNIST comparison on two CPU cores (the CHANGELOG has
  the step times); ``channels=(16, 32, 64), stem_stride=1`` is the usual
  CIFAR form."""

  def __init__(self, input_shape: Sequence[int], out_features: int, *,
               channels: Sequence[int] = (8, 16, 32), blocks: int = 1,
               stem_stride: int = 2, dropout: float = 0.0, rngs: nnx.Rngs):
    if len(input_shape) not in (2, 3):
      raise ValueError(f"ResNet takes images shaped (H, W) or (H, W, C); got "
                       f"{tuple(input_shape)}.")
    in_channels = input_shape[2] if len(input_shape) == 3 else 1
    self.stem = nnx.Conv(in_channels, channels[0], (3, 3), strides=stem_stride,
                         padding="SAME", use_bias=False, rngs=rngs)
    layers, width = [], channels[0]
    for i, c in enumerate(channels):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        layers.append(PreActBlock(width, c, stride, dropout=dropout, rngs=rngs))
        width = c
    self.blocks = nnx.List(layers)
    self.bn = BatchNorm(width)
    self.out = nnx.Linear(width, out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3:
      x = x[..., None]  # add the channel axis
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.out(jax.nn.relu(self.bn(x)).mean(axis=(1, 2)))


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


MODELS = ("mlp", "cnn", "resnet")


def make_model(name: str, input_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (256, 256), dropout: float = 0.0,
               rngs: nnx.Rngs) -> nnx.Module:
  """``"mlp"`` (inputs flattened), ``"cnn"`` or ``"resnet"`` (:class:`ResNet`,
  with BatchNorm) for inputs of ``input_shape`` (one example's shape);
  ``dropout`` for the MLP and the ResNet."""
  if name == "mlp":
    return Flatten(MLP(math.prod(input_shape), hidden, num_classes, dropout=dropout,
                       rngs=rngs))
  if name == "cnn":
    if dropout:
      raise ValueError("the cnn model has no dropout; use mlp or resnet.")
    return CNN(input_shape, num_classes, rngs=rngs)
  if name == "resnet":
    return ResNet(input_shape, num_classes, dropout=dropout, rngs=rngs)
  raise ValueError(f"unknown model {name!r}; use one of {MODELS}.")


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


def _fresh_rngs(rngs: Any, key: jax.Array) -> Any:
  """``rngs`` (an ``nnx.RngState`` state) with every stream keyed by
  ``fold_in(key, i)`` and its count at 0: this step's randomness, from the
  step's key alone."""
  leaves, tree = jax.tree.flatten(rngs)
  return jax.tree.unflatten(tree, [
      jax.random.fold_in(key, i) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else jnp.zeros_like(x) for i, x in enumerate(leaves)])


def stateful(module: nnx.Module, input_key: str = "x"
             ) -> tuple[rj.StatefulModel, Any, Any]:
  """Splits an NNX module with state or randomness (BatchNorm, Dropout,
  anything with non-``Param`` state) into (a :class:`rais_jax.StatefulModel`,
  its params, its model state).

  The model state is the module's variables other than ``nnx.Param`` and its
  RNG streams (e.g. ``nnx.BatchStat``). In training the module runs in
  ``train()`` mode, its RNG streams keyed from the step's key (so dropout
  masks depend on the step's key alone), and returns its updated state; in
  inference it runs in ``eval()`` mode. BatchNorm in training mode couples
  the examples of a batch: see :mod:`rais_jax.model` for the norms RAIS then
  uses, and :class:`BatchNorm` for the form ghost norms need.
  """
  # The model state: every variable that is neither a parameter nor an RNG stream.
  state_filter = nnx.Not(nnx.Any(nnx.Param, nnx.RngState))
  graphdef, params, *rest = nnx.split(module, nnx.Param, nnx.RngState, state_filter)
  rngs, model_state = rest

  def apply(p: Any, state: Any, batch: Any, key: Optional[jax.Array], train: bool):
    streams = rngs if key is None else _fresh_rngs(rngs, key)
    model = nnx.merge(graphdef, p, streams, state, copy=True)
    if train:
      model.train()
    else:
      model.eval()
    outputs = model(batch[input_key])
    return outputs, nnx.state(model, state_filter)

  return rj.StatefulModel(apply), params, model_state
