"""A zoo of small models for checking and timing per-example gradient norms.

Each entry builds ``(loss_fn, params, batch)`` with ``loss_fn(params, batch)``
returning per-example losses of shape (m,), covering the layer types the
ghost-norm method must handle: dense, convolutions (strides, padding, groups),
LayerNorm/RMSNorm scales and biases, multi-head attention, embeddings with
repeated tokens, a tied weight, a ``lax.scan`` over stacked layers, a
recurrent ``lax.scan`` with shared weights, and a Flax Linen model. ``size="test"`` is tiny (for unit tests), ``size="bench"``
is the size the norms benchmark times.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rais_jax.experiments.models import MLP, functional

PyTree = Any


class Problem(NamedTuple):
  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  params: PyTree
  batch: PyTree
  # Which overhead goal applies: "dense", "conv", "attention"; "embedding"
  # and "scan" (weights shared by the steps of a scan: the vmap fallback)
  # have none.
  kind: str


def _ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


def _nnx_problem(module: nnx.Module, batch: PyTree, kind: str) -> Problem:
  model_fn, params = functional(module)
  return Problem(lambda p, b: _ce(model_fn(p, b), b["label"]), params, batch,
                 kind)


def _images(key, m, side, channels, classes=10):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (m, side, side, channels)),
          "label": jax.random.randint(ky, (m,), 0, classes)}


def _vectors(key, m, dim, classes=10):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.normal(kx, (m, dim)),
          "label": jax.random.randint(ky, (m,), 0, classes)}


def _tokens(key, m, length, vocab, classes=10):
  kx, ky = jax.random.split(key)
  return {"x": jax.random.randint(kx, (m, length), 0, vocab),
          "label": jax.random.randint(ky, (m,), 0, classes)}


def mlp(m: int, size: str = "test", seed: int = 0) -> Problem:
  dims = (784, (512, 512)) if size == "bench" else (20, (32, 24))
  rngs = nnx.Rngs(seed)
  module = MLP(dims[0], dims[1], 10, rngs=rngs)
  return _nnx_problem(module, _vectors(jax.random.key(seed + 1), m, dims[0]),
                      "dense")


class CNN(nnx.Module):
  """Convolutions with several strides and paddings and a grouped one."""

  def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(channels, width, (3, 3), padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, padding="VALID",
                       rngs=rngs)
    self.c3 = nnx.Conv(2 * width, 2 * width, (3, 3), padding=((1, 1), (0, 2)),
                       feature_group_count=2, rngs=rngs)
    self.out = nnx.Linear(2 * width, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.c1(x))
    x = jax.nn.relu(self.c2(x))
    x = jax.nn.relu(self.c3(x))
    return self.out(x.mean(axis=(1, 2)))


def cnn(m: int, size: str = "test", seed: int = 0) -> Problem:
  side, channels, width = (28, 1, 16) if size == "bench" else (8, 3, 4)
  module = CNN(channels, width, rngs=nnx.Rngs(seed))
  return _nnx_problem(module,
                      _images(jax.random.key(seed + 1), m, side, channels),
                      "conv")


class PoolCNN(nnx.Module):
  """LeNet-style: convolution, ReLU and 2×2 max-pooling, twice, then dense."""

  def __init__(self, side: int, channels: int, width: int, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(channels, width, (3, 3), padding="SAME", rngs=rngs)
    self.c2 = nnx.Conv(width, 2 * width, (3, 3), padding="SAME", rngs=rngs)
    self.out = nnx.Linear((side // 4) ** 2 * 2 * width, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(jax.nn.relu(self.c1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(jax.nn.relu(self.c2(x)), (2, 2), (2, 2))
    return self.out(x.reshape(x.shape[0], -1))


def pool_cnn(m: int, size: str = "test", seed: int = 0) -> Problem:
  side, channels, width = (28, 1, 32) if size == "bench" else (8, 2, 3)
  module = PoolCNN(side, channels, width, rngs=nnx.Rngs(seed))
  return _nnx_problem(module,
                      _images(jax.random.key(seed + 1), m, side, channels),
                      "conv")


class NormMLP(nnx.Module):
  """Dense layers with LayerNorm and RMSNorm (learned scales and biases)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.n1 = nnx.LayerNorm(hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.n2 = nnx.RMSNorm(hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.gelu(self.n1(self.l1(x)))
    x = jax.nn.gelu(self.n2(self.l2(x)))
    return self.out(x)


def layernorm_mlp(m: int, size: str = "test", seed: int = 0) -> Problem:
  dim, hidden = (784, 512) if size == "bench" else (20, 32)
  module = NormMLP(dim, hidden, rngs=nnx.Rngs(seed))
  # Non-trivial scales and biases, so their gradients are not special.
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 7), p.shape),
      nnx.state(module, nnx.Param))
  nnx.update(module, params)
  return _nnx_problem(module, _vectors(jax.random.key(seed + 1), m, dim),
                      "dense")


class TransformerBlock(nnx.Module):
  """Pre-norm self-attention block on a sequence, mean-pooled classifier."""

  def __init__(self, dim_in: int, dim: int, heads: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Linear(dim_in, dim, rngs=rngs)
    self.n1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.n2 = nnx.LayerNorm(dim, rngs=rngs)
    self.ff1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.ff2 = nnx.Linear(4 * dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, 10, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x)
    h = h + self.attn(self.n1(h))
    h = h + self.ff2(jax.nn.gelu(self.ff1(self.n2(h))))
    return self.out(h.mean(axis=1))


def transformer(m: int, size: str = "test", seed: int = 0) -> Problem:
  length, dim_in, dim, heads = (32, 16, 128, 4) if size == "bench" else (
      6, 5, 16, 2)
  module = TransformerBlock(dim_in, dim, heads, rngs=nnx.Rngs(seed))
  kx, ky = jax.random.split(jax.random.key(seed + 1))
  batch = {"x": jax.random.normal(kx, (m, length, dim_in)),
           "label": jax.random.randint(ky, (m,), 0, 10)}
  return _nnx_problem(module, batch, "attention")


class TextModel(nnx.Module):
  """Token embedding, mean pooling, dense classifier."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.hidden = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, 10, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens).mean(axis=1)
    return self.out(jnp.tanh(self.hidden(h)))


def text(m: int, size: str = "test", seed: int = 0) -> Problem:
  # A small vocabulary relative to the length makes repeated tokens certain.
  vocab, length, dim = (5000, 64, 128) if size == "bench" else (7, 12, 8)
  module = TextModel(vocab, dim, rngs=nnx.Rngs(seed))
  return _nnx_problem(module, _tokens(jax.random.key(seed + 1), m, length,
                                      vocab), "embedding")


def tied(m: int, size: str = "test", seed: int = 0) -> Problem:
  """Embedding table E shared with the output layer (logits = h Eᵀ)."""
  # At test size the tied Gram form applies (3 positions × (10 + 6) ≤ 10 · 6).
  vocab, length, dim = (2000, 32, 128) if size == "bench" else (10, 2, 6)
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"embed": 0.3 * jax.random.normal(k1, (vocab, dim)),
            "mix": jax.random.normal(k2, (dim, dim)) / jnp.sqrt(dim)}

  def loss_fn(p, batch):
    h = jnp.tanh(p["embed"][batch["x"]].mean(axis=1) @ p["mix"])
    return _ce(h @ p["embed"].T, batch["label"])

  return Problem(loss_fn, params,
                 _tokens(jax.random.key(seed + 1), m, length, vocab, vocab),
                 "embedding")


def scan_layers(m: int, size: str = "test", seed: int = 0) -> Problem:
  """Residual tanh layers with stacked weights, applied by ``lax.scan``."""
  dim, depth = (256, 4) if size == "bench" else (12, 3)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w": jax.random.normal(k1, (depth, dim, dim)) / jnp.sqrt(dim),
            "b": 0.1 * jax.random.normal(k2, (depth, dim)),
            "out": jax.random.normal(k3, (dim, 10)) / jnp.sqrt(dim)}

  def loss_fn(p, batch):
    def layer(h, wb):
      w, b = wb
      return h + jnp.tanh(h @ w + b), None
    h, _ = jax.lax.scan(layer, batch["x"], (p["w"], p["b"]))
    return _ce(h @ p["out"], batch["label"])

  return Problem(loss_fn, params, _vectors(jax.random.key(seed + 1), m, dim),
                 "dense")


def rnn(m: int, size: str = "test", seed: int = 0) -> Problem:
  """A recurrent net: ``lax.scan`` over time with weights shared by all steps
  (ghost norms fall back to vmap over the scan for these)."""
  length, dim_in, dim = (32, 16, 128) if size == "bench" else (5, 3, 8)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w_in": jax.random.normal(k1, (dim_in, dim)) / jnp.sqrt(dim_in),
            "w_h": jax.random.normal(k2, (dim, dim)) / jnp.sqrt(dim),
            "out": jax.random.normal(k3, (dim, 10)) / jnp.sqrt(dim)}

  def loss_fn(p, batch):
    def cell(h, x_t):
      return jnp.tanh(x_t @ p["w_in"] + h @ p["w_h"]), None
    xs = jnp.swapaxes(batch["x"], 0, 1)  # time-major
    h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], dim)), xs)
    return _ce(h @ p["out"], batch["label"])

  kx, ky = jax.random.split(jax.random.key(seed + 1))
  batch = {"x": jax.random.normal(kx, (m, length, dim_in)),
           "label": jax.random.randint(ky, (m,), 0, 10)}
  return Problem(loss_fn, params, batch, "scan")


class _LinenMLP(linen.Module):
  hidden: int

  @linen.compact
  def __call__(self, x):
    x = jax.nn.relu(linen.Dense(self.hidden)(x))
    return linen.Dense(10)(x)


def linen_mlp(m: int, size: str = "test", seed: int = 0) -> Problem:
  dim, hidden = (784, 512) if size == "bench" else (20, 16)
  batch = _vectors(jax.random.key(seed + 1), m, dim)
  module = _LinenMLP(hidden)
  params = module.init(jax.random.key(seed), batch["x"][:1])

  def loss_fn(p, b):
    return _ce(module.apply(p, b["x"]), b["label"])

  return Problem(loss_fn, params, batch, "dense")


ZOO: dict[str, Callable[..., Problem]] = {
    "mlp": mlp, "cnn": cnn, "pool_cnn": pool_cnn, "layernorm_mlp": layernorm_mlp,
    "transformer": transformer, "text": text, "tied": tied,
    "scan_layers": scan_layers, "rnn": rnn, "linen_mlp": linen_mlp,
}
