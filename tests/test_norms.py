import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rais_jax import (choose_method, per_example_grad_norms,
                      softmax_cross_entropy_proxy_norms, value_grad_and_norms)
from rais_jax import norms as norms_lib


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k1, (6, 8)), "b1": jnp.zeros(8),
            "w2": jax.random.normal(k2, (8, 3)) * 0.3}
  batch = {"x": jax.random.normal(k3, (10, 6)), "y": jnp.arange(10) % 3}

  def loss_fn(p, b):
    logits = jnp.tanh(b["x"] @ p["w1"] + p["b1"]) @ p["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, batch


@pytest.mark.usefixtures("highest_precision")
def test_vmap_matches_python_loop():
  loss_fn, params, batch = _mlp()
  norms = jax.jit(lambda p, b: per_example_grad_norms(
      loss_fn, p, b, method="vmap"))(params, batch)
  one = jax.jit(lambda p, single: optax.tree.norm(
      jax.grad(lambda q: loss_fn(q, single).sum())(p)))
  for k in range(10):
    single = jax.tree.map(lambda x: x[k:k + 1], batch)
    np.testing.assert_allclose(norms[k], one(params, single), rtol=1e-5)
  chunked = per_example_grad_norms(loss_fn, params, batch, method="vmap",
                                   chunk_size=4)
  np.testing.assert_allclose(chunked, norms, rtol=1e-6)


def test_proxy_is_logit_gradient_norm():
  logits = jax.random.normal(jax.random.key(1), (7, 5))
  labels = jnp.arange(7) % 5
  g = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, labels).sum())(logits)
  np.testing.assert_allclose(softmax_cross_entropy_proxy_norms(logits, labels),
                             jnp.linalg.norm(g, axis=1), rtol=1e-6)


def test_errors():
  loss_fn, params, batch = _mlp()
  with pytest.raises(ValueError, match="method"):
    per_example_grad_norms(loss_fn, params, batch, method="nope")
  with pytest.raises(ValueError, match="per-example losses"):
    per_example_grad_norms(lambda p, b: loss_fn(p, b).mean(), params, batch)
  with pytest.raises(ValueError, match="leading"):
    per_example_grad_norms(loss_fn, params, {"x": batch["x"], "y": jnp.arange(3)})

  def python_branch(p, b):
    losses = loss_fn(p, b)
    return losses if losses.sum() > 0 else -losses

  for method in ("ghost", "vmap"):
    with pytest.raises(ValueError, match="cannot be traced by JAX"):
      per_example_grad_norms(python_branch, params, batch, method=method)


def _slowed(monkeypatch, slow_method):
  """Both methods as usual, but ``slow_method``'s pass sleeps 30 ms on the
  host; returns the list of the methods traced, in order."""
  original = norms_lib._value_grad_and_norms
  traced = []

  def patched(loss_fn, params, batch, weights, method):
    traced.append(method)
    out = original(loss_fn, params, batch, weights, method)
    if method == slow_method:
      jax.debug.callback(lambda: time.sleep(0.03))
    return out

  monkeypatch.setattr(norms_lib, "_value_grad_and_norms", patched)
  return traced


@pytest.mark.parametrize("slow", ["ghost", "vmap"])
def test_choose_method_takes_the_faster(monkeypatch, slow):
  """The choice follows the measurement (a 30 ms sleep against passes of well
  under 1 ms), from arrays, from shapes, and while an enclosing jit traces."""
  loss_fn, params, batch = _mlp()
  _slowed(monkeypatch, slow)
  other = {"ghost": "vmap", "vmap": "ghost"}[slow]
  assert choose_method(loss_fn, params, batch, repeats=3) == other
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, batch))
  assert choose_method(loss_fn, *shapes, repeats=3) == other
  chosen = []
  jax.jit(lambda p, b: chosen.append(choose_method(loss_fn, p, b, repeats=3)))(
      params, batch)
  assert chosen == [other]


@pytest.mark.usefixtures("highest_precision")  # jit vs eager: TF32 would round apart
def test_auto_computes_what_it_chose(monkeypatch):
  loss_fn, params, batch = _mlp()
  traced = _slowed(monkeypatch, "ghost")
  auto = jax.jit(lambda p, b: value_grad_and_norms(loss_fn, p, b, method="auto"))(
      params, batch)
  assert traced == ["ghost", "vmap", "vmap"]  # measured both, then built vmap
  vmap = value_grad_and_norms(loss_fn, params, batch, method="vmap")
  # (atol: float32 rounding of entries near 0 among gradients of ~0.05.)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               auto, vmap)


def test_vmap_out_of_memory_chooses_ghost(monkeypatch):
  loss_fn, params, batch = _mlp()
  original = norms_lib._value_grad_and_norms

  def failing_vmap(loss_fn, params, batch, weights, method):
    if method == "vmap":
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: stands in for XLA")
    return original(loss_fn, params, batch, weights, method)

  monkeypatch.setattr(norms_lib, "_value_grad_and_norms", failing_vmap)
  assert choose_method(loss_fn, params, batch, repeats=1) == "ghost"
  with pytest.raises(ValueError, match="repeats"):
    choose_method(loss_fn, params, batch, repeats=0)
