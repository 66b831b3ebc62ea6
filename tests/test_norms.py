import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rais_jax import per_example_grad_norms, softmax_cross_entropy_proxy_norms


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
  for k in range(10):
    single = jax.tree.map(lambda x: x[k:k + 1], batch)
    g = jax.grad(lambda p: loss_fn(p, single).sum())(params)
    np.testing.assert_allclose(norms[k], optax.tree.norm(g), rtol=1e-5)
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
