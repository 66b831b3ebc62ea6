"""Stateful models (BatchNorm, dropout), keys and augmentation through the one
step: against a hand-written NNX/optax loop, the modes, the per-example
shares of a coupled loss, unbiasedness with augmentation, and the fast
path's properties (no branch, resume, loader)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rais_jax as rj
from rais_jax import measure
from rais_jax.experiments import models
from rais_jax.model import step_keys
import hlo as hlo_lib  # pylint: disable=g-bad-import-order

N, M, K = 64, 8, 4
AUGMENT = rj.augment.chain(rj.augment.random_crop(1), rj.augment.horizontal_flip())


class _Net(nnx.Module):
  """conv → BatchNorm → ReLU → pool → dropout → dense."""

  def __init__(self, flax_batchnorm: bool, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
    self.bn = (nnx.BatchNorm(4, rngs=rngs) if flax_batchnorm else models.BatchNorm(4))
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn(self.conv(x[..., None])))
    return self.out(self.drop(x.mean((1, 2))))


def _data(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"x": jax.random.normal(k1, (N, 8, 8)),
          "label": jax.random.randint(k2, (N,), 0, 3)}


def _leaves_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.mark.parametrize("flax_batchnorm", [True, False])
def test_usgd_matches_a_hand_written_nnx_optax_loop(flax_batchnorm):
  """U-SGD through rais-jax (fast path, BatchNorm + dropout + crop and flip)
  equals a plain NNX/optax loop fed the same indices, keys and augmented
  batches: parameters and batch statistics after 20 steps."""
  data, key = _data(), jax.random.key(7)
  model, params, model_state = models.stateful(_Net(flax_batchnorm, nnx.Rngs(0)))
  sampler = rj.uniform_sampler(N, batch_size=M)
  opt = optax.sgd(0.1, momentum=0.9)
  runner = rj.make_runner(model, rj.softmax_cross_entropy_head(), opt, sampler,
                          norms=None, block_size=K, augment=AUGMENT)
  state, _ = runner.run(runner.init(params, model_state), key, data, 20)

  graphdef, p, rngs, stats = nnx.split(_Net(flax_batchnorm, nnx.Rngs(0)), nnx.Param,
                                       nnx.RngState, ...)
  opt_state = opt.init(p)
  for start in range(0, 20, K):
    block_key = jax.random.fold_in(key, start)
    indices = sampler.draw(sampler.init(), block_key, (K, M)).indices
    for t, step_key in enumerate(step_keys(block_key, start + jnp.arange(K))):
      model_key, augment_key = jax.random.split(step_key)
      batch = rj.augment.batch(AUGMENT, augment_key,
                               jax.tree.map(lambda x: x[indices[t]], data))

      def loss(q):
        net = nnx.merge(graphdef, q, models._fresh_rngs(rngs, model_key), stats,  # pylint: disable=cell-var-from-loop,protected-access
                        copy=True)
        net.train()
        losses = optax.softmax_cross_entropy_with_integer_labels(
            net(batch["x"]), batch["label"])  # pylint: disable=cell-var-from-loop
        return losses.mean(), nnx.state(net, nnx.BatchStat)

      (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(p)
      updates, opt_state = opt.update(grads, opt_state, p)
      p = optax.apply_updates(p, updates)
  _leaves_close(state.params, p, rtol=2e-5, atol=1e-6)
  _leaves_close(state.model_state, stats, rtol=2e-5, atol=1e-6)
  # The statistics moved from their start.
  assert not np.allclose(jax.tree.leaves(state.model_state)[0],
                         jax.tree.leaves(model_state)[0])


def test_modes_batch_statistics_and_dropout():
  """Training uses the batch's statistics and dropout (two keys, two
  losses) and updates the running averages; inference uses the running
  averages and no dropout (deterministic, no key)."""
  data = _data()
  model, params, state = models.stateful(_Net(False, nnx.Rngs(0)))
  batch = jax.tree.map(lambda x: x[:M], data)
  out1, new1 = model.apply(params, state, batch, jax.random.key(1), True)
  out2, new2 = model.apply(params, state, batch, jax.random.key(2), True)
  assert not np.allclose(out1, out2)  # dropout is on, keyed by the step
  _leaves_close(new1, new2)  # the statistics do not depend on the mask
  assert not np.allclose(jax.tree.leaves(new1)[0], jax.tree.leaves(state)[0])
  infer = rj.inference(model, new1)
  np.testing.assert_array_equal(infer(params, batch), infer(params, batch))
  # Inference reads the running averages it is given.
  assert not np.allclose(infer(params, batch), rj.inference(model, state)(params, batch))


def _coupled_problem():
  """A dense → BatchNorm (scale on the normalised input) → ReLU → dense
  softmax model, as a function of the parameters of each example's rows
  (``per_example`` copies, leading axis m) or shared ones."""
  k = jax.random.split(jax.random.key(3), 4)
  params = {"w1": jax.random.normal(k[0], (5, 6)) / 2, "gamma": 1 + 0.1 * jnp.arange(6.0),
            "beta": 0.05 * jnp.arange(6.0), "w2": jax.random.normal(k[1], (6, 3)) / 2}
  batch = {"x": jax.random.normal(k[2], (M, 5)), "label": jnp.arange(M) % 3}

  def losses(p, b, per_example=False):
    h = jnp.einsum("mi,mio->mo", b["x"], p["w1"]) if per_example else b["x"] @ p["w1"]
    mean, var = h.mean(0), (h * h).mean(0) - h.mean(0) ** 2
    xhat = (h - mean) * jax.lax.rsqrt(var + 1e-5)
    y = jax.nn.relu(p["gamma"] * xhat + p["beta"])
    logits = (jnp.einsum("mi,mio->mo", y, p["w2"]) if per_example else y @ p["w2"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])

  return params, batch, losses


@pytest.mark.usefixtures("highest_precision")
def test_coupled_loss_norms_are_each_examples_share_of_the_gradient():
  """BatchNorm in training mode: ghost norms (``coupled=True``) are ‖∂L/∂θ_k‖/w_k,
  θ_k a copy of the parameters used by example k's rows only (at θ_k = θ,
  Σ_k ∂L/∂θ_k is the true gradient); the gradient is the true one."""
  params, batch, losses = _coupled_problem()
  w = jnp.linspace(0.5, 2.0, M) / M
  got_losses, grads, norms = jax.jit(lambda p: rj.ghost.value_grad_and_norms(
      lambda q, b: losses(q, b), p, batch, w, coupled=True))(params)
  tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (M,) + x.shape), params)
  shares = jax.grad(lambda q: jnp.sum(w * losses(q, batch, per_example=True)))(tiled)
  true = jax.grad(lambda q: jnp.sum(w * losses(q, batch)))(params)
  np.testing.assert_allclose(got_losses, losses(params, batch), rtol=1e-6)
  _leaves_close(grads, true, rtol=1e-5, atol=1e-7)
  _leaves_close(jax.tree.map(lambda s: s.sum(0), shares), true, rtol=1e-5, atol=1e-7)
  expected = jnp.sqrt(sum(jnp.sum(s.reshape(M, -1) ** 2, 1)
                          for s in jax.tree.leaves(shares))) / w
  np.testing.assert_allclose(norms, expected, rtol=1e-5)
  # Not the per-example gradients of a batch of one (BatchNorm would see
  # only that example).
  alone = rj.per_example_grad_norms(losses, params, batch, method="vmap",
                                    separable_check=False)
  assert not np.allclose(alone, expected, rtol=1e-2)


def test_rais_trains_a_batchnorm_model_and_refuses_flax_batchnorm():
  data = _data()
  labels = np.asarray(data["label"])
  sampler = rj.rais_sampler(rj.default_features(labels, 3), batch_size=M)
  head = rj.softmax_cross_entropy_head()
  model, params, state = models.stateful(_Net(False, nnx.Rngs(0)))
  runner = rj.make_runner(model, head, rj.rais_sgd(0.1), sampler, block_size=K,
                          norms="exact", augment=AUGMENT)
  with pytest.raises(ValueError, match="probes"):
    runner.gain_ratio(runner.init(params, state))
  out, metrics = runner.run(runner.init(params, state), jax.random.key(0), data, 4 * K)
  assert runner.programs.spec.coupled and runner.programs.spec.norms == "exact"
  # r of a coupled loss: the moment ratio of its shares (rais_jax.gain_ratio).
  moments = rj.gain_ratio.update(rj.gain_ratio.init(), jnp.linspace(0.1, 3, M),
                                 jnp.linspace(0.5, 2, M) / N, N, jnp.float32(0.5))
  np.testing.assert_allclose(
      runner.programs.spec.gain_ratio(moments),
      rj.gain_ratio.estimate(moments, M, coupled=True), rtol=1e-6)
  assert float(runner.programs.spec.gain_ratio(moments)) > 1.05
  assert int(out.step) == 4 * K and np.isfinite(np.asarray(metrics.loss)).all()
  flax_model, flax_params, flax_state = models.stateful(_Net(True, nnx.Rngs(0)))
  flax_runner = rj.make_runner(flax_model, head, rj.rais_sgd(0.1), sampler,
                               block_size=K, norms="exact")
  with pytest.raises(ValueError, match="line up"):
    flax_runner.run(flax_runner.init(flax_params, flax_state), jax.random.key(0), data, K)
  with pytest.raises(ValueError, match="share of the training gradient"):
    rj.make_runner(model, head, rj.rais_sgd(0.1), sampler, block_size=K,
                   norms="exact", exact_method="vmap").run(
                       runner.init(params, state), jax.random.key(0), data, K)
  proxy = rj.make_runner(model, head, rj.rais_sgd(0.1), sampler, block_size=K,
                         norms="proxy", augment=AUGMENT)
  out, metrics = proxy.run(proxy.init(params, state), jax.random.key(0), data, 4 * K)
  assert not proxy.programs.spec.halves  # a coupled loss's r needs no halves
  assert np.isfinite(np.asarray(metrics.loss)).all()
  assert float(out.moments.grad_weight) > 0


def test_default_norms_are_proxy_for_a_coupled_loss_only():
  """norms="auto" (the default): proxy norms where the loss couples examples
  (then flax.nnx.BatchNorm trains too), exact ones otherwise; an odd batch
  (no halves) gets exact norms either way."""
  data = _data()
  labels = np.asarray(data["label"])
  head = rj.softmax_cross_entropy_head()
  features = rj.default_features(labels, 3)
  cases = [(_Net(True, nnx.Rngs(0)), M, "proxy"), (_Net(False, nnx.Rngs(0)), M, "proxy"),
           (_Net(False, nnx.Rngs(0)), M - 1, "exact"), (_DropNet(nnx.Rngs(0)), M, "exact")]
  for net, m, expected in cases:
    model, params, state = models.stateful(net)
    runner = rj.make_runner(model, head, rj.rais_sgd(0.1),
                            rj.rais_sampler(features, batch_size=m), block_size=K)
    with pytest.raises(ValueError, match="probes"):
      runner.programs.spec.norms
    out, metrics = runner.run(runner.init(params, state), jax.random.key(0), data, 2 * K)
    assert runner.programs.spec.norms == expected, (type(net).__name__, m)
    assert np.isfinite(np.asarray(metrics.loss)).all()
    assert int(out.sampler.diagnostics.nonfinite_norms) == 0
  model_fn, params = models.functional(_DropNet(nnx.Rngs(0)))
  plain = rj.make_runner(model_fn, head, rj.rais_sgd(0.1),
                         rj.rais_sampler(features, batch_size=M), block_size=K)
  assert plain.programs.spec.norms == "exact"


class _DropNet(nnx.Module):
  """dense → ReLU → dropout → dense: state-free, keyed, separable."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 8, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))))


@pytest.mark.usefixtures("highest_precision")
@pytest.mark.parametrize("coupled", [True, False])
def test_proxy_norms_of_a_stateful_model(coupled):
  """Proxy norms in training mode from one forward pass of the whole batch:
  the true training gradient and new state, u_k = ‖∂f_k/∂outputs_k‖, and
  (for a loss that does not couple examples) ⟨g_A, g_B⟩ of the two halves'
  mean gradients within that batch."""
  module = _Net(False, nnx.Rngs(0)) if coupled else _DropNet(nnx.Rngs(0))
  model, params, state = models.stateful(module)
  head = rj.softmax_cross_entropy_head()
  batch = jax.tree.map(lambda x: x[:M], _data())
  w, key = jnp.linspace(0.5, 2.0, M), jax.random.key(5)
  grads, u, inner, losses, new_state = measure.measured_gradient_stateful(
      model, head, params, state, key, batch, w, norms="proxy", coupled=coupled)
  ref_grads, _, _, ref_losses, ref_state = measure.measured_gradient_stateful(
      model, head, params, state, key, batch, w, norms=None)
  _leaves_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  _leaves_close(new_state, ref_state, rtol=1e-6)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  outputs = model.apply(params, state, batch, key, True)[0]
  dz = jax.grad(lambda z: jnp.sum(head(z, batch)))(outputs)
  np.testing.assert_allclose(u, jnp.linalg.norm(dz, axis=1), rtol=1e-5)

  def half_mean_grad(half):
    mask = (jnp.arange(M) < M // 2) == (half == 0)
    return jax.grad(lambda p: jnp.sum(jnp.where(mask, w, 0) * head(
        model.apply(p, state, batch, key, True)[0], batch)) / (M // 2))(params)

  if coupled:
    assert inner is None
  else:
    g_a, g_b = half_mean_grad(0), half_mean_grad(1)
    expected = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_a),
                                                   jax.tree.leaves(g_b)))
    np.testing.assert_allclose(inner, expected, rtol=1e-5)


def test_weighted_gradient_stays_unbiased_under_augmentation():
  """E over draws and flips of the per-step API's g_R equals the exact
  expected gradient over the flip distribution, (1/n) Σ_i ½(∇f(x_i) +
  ∇f(flip x_i)), for a linear softmax model on a fitted, non-uniform RAIS
  sampler, over 8000 steps from one state. The step is recovered from the
  update (sgd, lr 1, r = 1). z-test per coordinate at |z| < 4.5 (a correct
  step fails with probability ~2e-5 each); without the weights (a mutant)
  the mean moves by more than 6 standard errors at this seed (asserted
  below)."""
  n, m = 48, 8
  k1, k2 = jax.random.split(jax.random.key(4))
  data = {"x": jax.random.normal(k1, (n, 3, 3)) + jnp.linspace(0, 2, 3),
          "label": jax.random.randint(k2, (n,), 0, 2)}
  params = {"w": jnp.zeros((9, 2)), "b": jnp.zeros((2,))}
  model_fn = lambda p, b: b["x"].reshape(b["x"].shape[0], -1) @ p["w"] + p["b"]
  head = rj.softmax_cross_entropy_head()
  loss = lambda p, b: head(model_fn(p, b), b)
  sampler = rj.rais_sampler(rj.default_features(np.asarray(data["label"]), 2),
                            batch_size=m, r_max=1.0,  # r = 1: g_R = -update
                            pt_mode="sync")  # vmapped: no host callback
  flip = rj.augment.horizontal_flip()
  step = rj.make_train_step(model_fn, head, rj.rais_sgd(1.0), sampler, augment=flip)
  state = rj.init_train_state(params, rj.rais_sgd(1.0), sampler)
  # Fit the sampler: a few real steps give it non-uniform p.
  fitted = jax.jit(lambda s, ks: jax.lax.scan(lambda c, k: (step(c, k, data)[0], None),
                                               s, ks)[0])
  state = fitted(state, jax.vmap(jax.random.key)(jnp.arange(100, 130)))
  p = np.asarray(sampler.probabilities(state.sampler))
  assert p.max() / p.min() > 1.3  # a non-uniform distribution to be unbiased under
  estimates = jax.jit(jax.vmap(lambda key: jax.tree.map(
      jnp.subtract, state.params, step(state, key, data)[0].params)))(
          jax.random.split(jax.random.key(0), 8_000))
  flipped = {**data, "x": data["x"][:, :, ::-1]}
  exact = jax.tree.map(lambda a, b: 0.5 * (a + b),
                       *(jax.grad(lambda q, d=d: loss(q, d).mean())(state.params)
                         for d in (data, flipped)))
  for est, truth in zip(jax.tree.leaves(estimates), jax.tree.leaves(exact)):
    est = np.asarray(est, np.float64).reshape(len(est), -1)
    se = est.std(0, ddof=1) / np.sqrt(len(est))
    z = np.abs(est.mean(0) - np.asarray(truth).ravel()) / se
    assert z.max() < 4.5, z
  # The test has power: the same draws' unweighted mean of the examples'
  # flip-averaged gradients (the mutant "weights → 1") is rejected.
  idx = jax.vmap(lambda key: sampler.sample(state.sampler, key).indices)(
      jax.random.split(jax.random.key(0), 8_000))
  per_example = jax.vmap(lambda d: jax.tree.map(
      lambda a, b: 0.5 * (a + b), *(jax.grad(lambda q, e=e: loss(
          q, jax.tree.map(lambda x: x[None], e))[0])(state.params)
                                    for e in (d, {**d, "x": d["x"][:, ::-1]}))))(data)
  flat = np.concatenate([np.asarray(g).reshape(n, -1) for g in jax.tree.leaves(per_example)],
                        1)
  truth = np.concatenate([np.asarray(g).ravel() for g in jax.tree.leaves(exact)])
  unweighted = flat[np.asarray(idx)].mean(1)
  se = unweighted.std(0, ddof=1) / np.sqrt(len(unweighted))
  z_mutant = (np.abs(unweighted.mean(0) - truth) / se).max()
  assert z_mutant > 6, z_mutant


def test_augmentations():
  """Crops are windows of the zero-padded image at offsets in [0, 2p]²,
  every offset drawn; flips mirror W about half the time; chain keys each."""
  x = jnp.arange(16.0).reshape(4, 4) + 1
  crop = rj.augment.random_crop(1)
  padded = np.pad(np.asarray(x), 1)
  seen = set()
  for i in range(200):
    out = np.asarray(crop(jax.random.key(i), {"x": x})["x"])
    match = [(a, b) for a in range(3) for b in range(3)
             if np.array_equal(out, padded[a:a + 4, b:b + 4])]
    assert len(match) == 1
    seen.add(match[0])
  assert len(seen) == 9
  flips = [bool(np.array_equal(rj.augment.horizontal_flip()(
      jax.random.key(i), {"x": x})["x"], x[:, ::-1])) for i in range(400)]
  assert 160 < sum(flips) < 240  # binomial(400, ½): 4 standard deviations
  rgb = jnp.ones((4, 4, 3))
  assert rj.augment.chain(crop, rj.augment.horizontal_flip())(
      jax.random.key(0), {"x": rgb})["x"].shape == (4, 4, 3)
  with pytest.raises(ValueError, match="padding"):
    rj.augment.random_crop(-1)
  with pytest.raises(ValueError, match=r"\(H, W\)"):
    crop(jax.random.key(0), {"x": jnp.ones(5)})


def test_unrolled_blocks_match_the_loop_and_hold_no_loop():
  """``unroll=True`` (for convolutions on CPU): the same run as the looped
  block to float tolerance, and the dispatched program has no loop around
  the steps (a scan of one block would still be one)."""
  data = _data()
  labels = np.asarray(data["label"])
  model, params, state = models.stateful(_Net(False, nnx.Rngs(0)))
  runs = {}
  for unroll in (False, True):
    runner = rj.make_runner(model, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.1),
                            rj.rais_sampler(rj.default_features(labels, 3), batch_size=M),
                            block_size=K, augment=AUGMENT, unroll=unroll)
    runs[unroll], _ = runner.run(runner.init(params, state), jax.random.key(5), data, 3 * K)
  _leaves_close(runs[True].params, runs[False].params, rtol=1e-5, atol=1e-6)
  _leaves_close(runs[True].model_state, runs[False].model_state, rtol=1e-5, atol=1e-6)
  hlo = runner.compiled.blocks.lower(runs[True], jax.random.key(0), data, num_blocks=1,
                                     num_steps=K).compile().as_text()
  comps = hlo_lib.computations(hlo)
  in_loops = set().union(*(hlo_lib.reachable(comps, body) for body in
                           re.findall(r"while\(.*?body=%([\w.\-]+)", hlo)))
  assert not [c for c in in_loops if "convolution" in comps[c]]
  assert [c for c in comps if "convolution" in comps[c]]  # the check can fail


def test_fast_path_with_state_keys_and_augmentation():
  """With model state, keys and augmentation on: host solves with and without
  waiting give bit-identical runs; resuming from a host copy mid-run is
  bit-identical (the step keys depend on the block's key and the step
  number only); a loader gives the run device data gives; the compiled
  block's step loop holds no conditional, nested loop or host callback; and
  O-SGD (the oracle's norms in inference mode) and Selective-Backprop (its
  candidates forwarded in inference mode) train on the model."""
  data = _data()
  labels = np.asarray(data["label"])
  model, params, state = models.stateful(_Net(False, nnx.Rngs(0)))
  head, key = rj.softmax_cross_entropy_head(), jax.random.key(3)

  def runner_of(sampler):
    return rj.make_runner(model, head, rj.rais_sgd(0.1), sampler, block_size=K,
                          augment=AUGMENT)

  runners = {mode: runner_of(rj.rais_sampler(rj.default_features(labels, 3), batch_size=M,
                                             buffer_size=32, pt_mode=mode))
             for mode in ("async", "sync")}
  runs = {mode: jax.device_get(r.run(r.init(params, state), key, data, 12 * K))
          for mode, r in runners.items()}
  assert int(runs["async"][0].sampler.diagnostics.pt_solves) >= 2
  jax.tree.map(np.testing.assert_array_equal, runs["async"], runs["sync"])
  sync = runners["sync"]
  half, _ = sync.run(sync.init(params, state), key, data, 6 * K)
  resumed, _ = sync.run(jax.device_put(jax.device_get(half)), key, data, 6 * K)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), runs["sync"][0])
  host = jax.device_get(data)
  loaded, _ = sync.run(sync.init(params, state), key,
                       lambda idx: jax.tree.map(lambda x: x[idx], host), 12 * K)
  _leaves_close(loaded.params, runs["sync"][0].params, rtol=1e-6, atol=1e-7)
  _leaves_close(loaded.model_state, runs["sync"][0].model_state, rtol=1e-6, atol=1e-7)
  for r in runners.values():
    r.close()
  hlo = jax.jit(sync.programs.steps).lower(sync.init(params, state), jax.random.key(0),
                                           data).compile().as_text()
  steps = [text for text in hlo_lib.top_level_loops(hlo) if "convolution" in text]
  assert len(steps) == 1, f"{len(steps)} top-level loops hold the convolutions"
  assert " conditional(" not in steps[0]
  # XLA:CPU runs threefry's rounds as a loop: the keys and augmentations'
  # random numbers are the only loops allowed inside a step.
  nested = [re.search(r'op_name="([^"]+)"', line).group(1)
            for line in steps[0].split("\n") if " while(" in line]
  assert nested and all(re.search(r"threefry|_randint|_uniform|_bernoulli", n)
                        for n in nested), nested
  assert not [c for c in re.findall(r'custom_call_target="([^"]+)"', steps[0])
              if "callback" in c.lower()]
  for sampler in (rj.oracle_sampler(N, batch_size=M),
                  rj.baselines.selective_backprop(N, batch_size=M)):
    r = runner_of(sampler)
    out, metrics = r.run(r.init(params, state), key, data, K)
    assert np.isfinite(np.asarray(metrics.loss)).all(), sampler.name
    assert not np.allclose(jax.tree.leaves(out.model_state)[0],
                           jax.tree.leaves(state)[0]), sampler.name


def test_sampled_gain_ratio_of_a_coupled_model_is_one_at_uniform_p():
  """The Monte Carlo gain ratio runs the step's training mode (BatchNorm's
  batch statistics, dropout, crop and flip): before (PT) has fitted RAIS's p
  is uniform, so minibatches drawn from it are drawn as U-SGD's and r = 1;
  the estimate is within 4 standard errors of 1 (false alarm rate 6e-5),
  with an error under 0.1."""
  data = _data()
  model, params, model_state = models.stateful(_Net(False, nnx.Rngs(0)))
  sampler = rj.rais_sampler(rj.default_features(np.asarray(data["label"]), 3),
                            batch_size=M)
  with rj.make_runner(model, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.1), sampler,
                      block_size=K, augment=AUGMENT) as runner:
    state = runner.init(params, model_state)
    got = jax.jit(lambda s, d, k: runner.sampled_gain_ratio(s, d, k, draws=400))(
        state, data, jax.random.key(0))
  ratio, se = float(got.ratio), float(got.standard_error)
  assert 0 < se < 0.1, (ratio, se)
  assert abs(ratio - 1.0) <= 4 * se, (ratio, se)
