"""Ghost norms (the whole pass, :mod:`rais_jax.ghost.backward`) agree with the
vmap reference on a zoo of models; the kernels alone: test_ghost_kernels.py."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

import rais_jax as rj
from rais_jax.ghost import batched as batched_lib
from rais_jax.testing import zoo

M = 6

# Exactness checks at full float32 (the default on CPU; TF32 on GPUs).
pytestmark = pytest.mark.usefixtures("highest_precision")


def _vmap_norms(loss_fn, params, batch):
  return jax.jit(lambda p, b: rj.per_example_grad_norms(loss_fn, p, b, method="vmap"))(
      params, batch)


def _reference(problem, weights):
  @jax.jit
  def parts(p, b):
    losses, backward = jax.vjp(lambda q: problem.loss_fn(q, b), p)
    return losses, backward(weights)[0]
  losses, grads = parts(problem.params, problem.batch)
  return losses, grads, _vmap_norms(problem.loss_fn, problem.params, problem.batch)


def _assert_grads_close(grads, ref):
  # Relative to the largest entry, so leaves whose gradient is exactly zero in
  # theory (the key bias of attention) compare at round-off.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6 * scale), grads, ref)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_zoo_at_default_precision(name):
  """At the backend's default matmul precision (TF32 on recent GPUs: inputs
  rounded to 10 mantissa bits, relative error ~5e-4 per product), ghost and
  vmap norms round differently; 1e-2 relative bounds that with margin."""
  problem = zoo.ZOO[name](M)
  with jax.default_matmul_precision("default"):
    _, _, norms = jax.jit(lambda p, b: rj.value_grad_and_norms(
        problem.loss_fn, p, b))(problem.params, problem.batch)
    ref = _vmap_norms(problem.loss_fn, problem.params, problem.batch)
  np.testing.assert_allclose(norms, ref, rtol=1e-2)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_zoo_matches_vmap(name):
  problem = zoo.ZOO[name](M)
  weights = jax.random.uniform(jax.random.key(3), (M,), minval=0.2, maxval=3.0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    losses, grads, norms = jax.jit(
        lambda p, b: rj.value_grad_and_norms(problem.loss_fn, p, b, weights=weights))(
            problem.params, problem.batch)
  ref_losses, ref_grads, ref_norms = _reference(problem, weights)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  _assert_grads_close(grads, ref_grads)
  messages = [str(w.message) for w in caught if "ghost norms" in str(w.message)]
  if name == "rnn":
    # The fallback path: the parameters shared by the scan's steps are named.
    assert len(messages) == 1 and "['w_in']" in messages[0] and "['w_h']" in messages[0]
    assert "scan" in messages[0] and "['out']" not in messages[0]
  else:
    assert not messages


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_batched_trace_matches_the_one_example_trace(name, monkeypatch):
  """The forward/backward pass runs on the loss traced at the batch's size
  (as fast as a plain gradient); the vmap of the one-example trace is the
  fallback where the two traces do not line up. Both give the same result,
  and every zoo model but the RNN (its scan carries the examples) takes the
  batched trace."""
  problem = zoo.ZOO[name](M)
  weights = jax.random.uniform(jax.random.key(3), (M,), minval=0.2, maxval=3.0)
  run = lambda: jax.jit(lambda p, b: rj.value_grad_and_norms(
      problem.loss_fn, p, b, weights=weights))(problem.params, problem.batch)
  taken = []
  original = batched_lib.batched_trace
  monkeypatch.setattr(batched_lib, "batched_trace",
                      lambda *a, **k: taken.append(original(*a, **k) is not None)
                      or original(*a, **k))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    batched = run()
    monkeypatch.setattr(batched_lib, "batched_trace", lambda *a, **k: None)
    fallback = run()
  assert taken == [name != "rnn"]
  np.testing.assert_allclose(batched[2], fallback[2], rtol=1e-5)
  np.testing.assert_allclose(batched[0], fallback[0], rtol=1e-6)
  _assert_grads_close(batched[1], fallback[1])


def test_equinox_model():
  """An Equinox model (a pytree module, vmapped over examples inside the loss)."""
  eqx = pytest.importorskip("equinox")  # a dev dependency: installed in CI
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  model = eqx.nn.Sequential([eqx.nn.Linear(5, 8, key=k1), eqx.nn.Lambda(jnp.tanh),
                             eqx.nn.LayerNorm(8), eqx.nn.Linear(8, 3, key=k2)])
  params, static = eqx.partition(model, eqx.is_inexact_array)
  batch = {"x": jax.random.normal(k3, (M, 5)), "label": jnp.arange(M) % 3}

  def loss_fn(p, b):
    logits = jax.vmap(eqx.combine(p, static))(b["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])

  ghost = rj.per_example_grad_norms(loss_fn, params, batch)
  np.testing.assert_allclose(ghost, _vmap_norms(loss_fn, params, batch), rtol=1e-5)


def test_parameters_combined_before_use():
  """Weight normalisation (W = g v/‖v‖) and a weight used twice in one layer:
  the per-example gradient is pulled back through the parameter-only map."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"v": jax.random.normal(k1, (5, 4)), "g": jnp.array(1.7),
            "w": jax.random.normal(k2, (4, 4))}
  batch = {"x": jax.random.normal(k3, (M, 5)), "label": jnp.arange(M) % 4}

  def loss_fn(p, b):
    w = p["g"] * p["v"] / jnp.linalg.norm(p["v"])
    h = jnp.tanh(b["x"] @ w)
    h = h @ p["w"] + jnp.tanh(h) @ p["w"].T + jnp.sum(p["w"] ** 2)
    return optax.softmax_cross_entropy_with_integer_labels(h, b["label"])

  ghost = rj.per_example_grad_norms(loss_fn, params, batch)
  ref = _vmap_norms(loss_fn, params, batch)
  np.testing.assert_allclose(ghost, ref, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fill", "clip"])
@pytest.mark.parametrize("length", [12, 600])
def test_embedding_lookup_modes(mode, length):
  """Negative ids wrap; out-of-range ids are dropped ("fill", zero rows, no
  gradient) or clamped ("clip"). Short sequences label repeated tokens by
  first occurrence, long ones (> 512) by sorting."""
  vocab = 7
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"table": jax.random.normal(k1, (vocab, 5)),
            "w": jax.random.normal(k2, (5, 3))}
  batch = {"x": jax.random.randint(k3, (M, length), -3, vocab + 3),
           "label": jnp.arange(M) % 3}

  def loss_fn(p, b):
    rows = jnp.take(p["table"], b["x"], axis=0, mode=mode, fill_value=0.0)
    return optax.softmax_cross_entropy_with_integer_labels(
        jnp.tanh(rows.mean(1)) @ p["w"], b["label"])

  ghost = rj.per_example_grad_norms(loss_fn, params, batch)
  ref = _vmap_norms(loss_fn, params, batch)
  assert np.all(np.isfinite(ref))
  np.testing.assert_allclose(ghost, ref, rtol=1e-5)


def test_shape_polymorphic_in_batch_size():
  problem = zoo.transformer(M)
  fn = jax.jit(lambda p, b: rj.per_example_grad_norms(problem.loss_fn, p, b))
  (m,) = export.symbolic_shape("m")
  spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct((m,) + x.shape[1:], x.dtype),
                      problem.batch)
  exported = export.export(fn)(problem.params, spec)
  for size in (3, 11):
    batch = jax.tree.map(lambda x: jnp.concatenate([x, x])[:size], problem.batch)
    ref = _vmap_norms(problem.loss_fn, problem.params, batch)
    np.testing.assert_allclose(exported.call(problem.params, batch), ref, rtol=1e-5)


def test_weights_and_errors():
  problem = zoo.mlp(M)
  weights = jnp.array([1.0, 0.0, 2.0, 1.0, 1.0, 1.0])
  _, _, norms = rj.value_grad_and_norms(problem.loss_fn, problem.params, problem.batch,
                                        weights=weights)
  ref = rj.per_example_grad_norms(problem.loss_fn, problem.params, problem.batch)
  assert np.isnan(norms[1])
  np.testing.assert_allclose(np.delete(norms, 1), np.delete(ref, 1), rtol=1e-6)
  with pytest.raises(ValueError, match="weights must have shape"):
    rj.value_grad_and_norms(problem.loss_fn, problem.params, problem.batch,
                            weights=jnp.ones(3))
  with pytest.raises(ValueError, match="does not depend on the batch"):
    rj.per_example_grad_norms(
        lambda p, b: jnp.broadcast_to(jnp.sum(p["out"]["bias"][...]), b["label"].shape),
                              problem.params, problem.batch, separable_check=False)


def test_unrolled_scans():
  """Scans over stacked weights are unrolled (each step's layer ghosted):
  a reversed scan, a nested one, and a stacked weight also used whole outside
  the scan (then its parts overlap and the whole leaf is pulled back)."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  params = {"w": jax.random.normal(k1, (3, 4, 4)) / 2,
            "v": jax.random.normal(k2, (2, 3, 4, 4)) / 2,
            "u": jax.random.normal(k3, (2, 4, 4)) / 2}
  batch = {"x": jax.random.normal(k4, (M, 4)), "label": jnp.arange(M) % 4}

  def loss_fn(p, b):
    def layer(h, w):
      return jnp.tanh(h @ w), None
    h, _ = jax.lax.scan(layer, b["x"], p["w"], reverse=True)
    h, _ = jax.lax.scan(lambda h, v: jax.lax.scan(layer, h, v), h, p["v"])
    h, _ = jax.lax.scan(layer, h @ p["u"].sum(0), p["u"])
    return optax.softmax_cross_entropy_with_integer_labels(h, b["label"])

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback
    ghost = rj.per_example_grad_norms(loss_fn, params, batch)
  np.testing.assert_allclose(ghost, _vmap_norms(loss_fn, params, batch), rtol=1e-5)


@pytest.mark.parametrize("length", [2, 8])
def test_tied_weight_gram_and_pulled_back(length):
  """The tied model at T=2 uses the shared Gram form ((T+1)(V+d) ≤ V d) and
  at T=8 pulls the per-example gradients back instead; both are exact."""
  problem = zoo.tied(M)
  batch = {"x": jnp.tile(problem.batch["x"], (1, 4))[:, :length],
           "label": problem.batch["label"]}
  ghost = rj.per_example_grad_norms(problem.loss_fn, problem.params, batch)
  np.testing.assert_allclose(ghost, _vmap_norms(problem.loss_fn, problem.params, batch),
                             rtol=1e-5)


@jax.custom_jvp
def _scaled_softplus(w, h):
  return jax.nn.softplus(h @ w)


@_scaled_softplus.defjvp
def _scaled_softplus_jvp(primals, tangents):
  (w, h), (dw, dh) = primals, tangents
  z = h @ w
  return jax.nn.softplus(z), jax.nn.sigmoid(z) * (dh @ w + h @ dw)


@pytest.mark.parametrize("where", ["cond", "custom_jvp"])
def test_parameters_inside_higher_order_equations_fall_back_to_vmap(where):
  """The guide's claim: parameters used inside a ``cond`` or custom-JVP
  function are computed by vmap over that equation's VJP (exact), named in a
  warning; the other parameters stay ghosted (not named). (A scan sharing its
  weights across steps: the rnn of test_zoo_matches_vmap. A ``while`` cannot
  be differentiated in reverse mode at all.)"""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"inner": jax.random.normal(k1, (4, 4)) / 2,
            "out": jax.random.normal(k2, (4, 3)) / 2}
  batch = {"x": jax.random.normal(k3, (M, 4)), "label": jnp.arange(M) % 3}

  def loss_fn(p, b):
    h = b["x"]
    if where == "cond":
      h = jax.lax.cond(jnp.sum(b["label"]) >= 0, lambda h: jnp.tanh(h @ p["inner"]),
                       lambda h: h, h)
    else:
      h = _scaled_softplus(p["inner"], h)
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["out"], b["label"])

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ghost = rj.per_example_grad_norms(loss_fn, params, batch)
  np.testing.assert_allclose(ghost, _vmap_norms(loss_fn, params, batch), rtol=1e-5)
  messages = [str(w.message) for w in caught if "ghost norms" in str(w.message)]
  assert len(messages) == 1, messages
  assert "['inner']" in messages[0] and "'out'" not in messages[0]
