import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rais_jax as rj
from rais_jax import checkpoint
from rais_jax.experiments.models import MLP, functional

N, M, CLASSES = 200, 16, 4


def _setup(n=N, classes=CLASSES, buffer_size=64, hidden=16):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, n)
  data = {"x": jnp.asarray(rng.normal(size=(n, 6)) + labels[:, None], jnp.float32),
          "label": jnp.asarray(labels, jnp.int32)}
  model_fn, params = functional(MLP(6, [hidden], classes, rngs=nnx.Rngs(0)))
  sampler = rj.rais_sampler(rj.default_features(labels, classes), batch_size=M,
                            buffer_size=buffer_size)
  opt = rj.rais_sgd(0.05, momentum=0.9)
  step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt, sampler)
  run = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: step(c, kk, data), s, k)[0])
  return sampler, run, rj.init_train_state(params, opt, sampler)


def test_save_mid_run_and_resume_bit_identically(tmp_path):
  sampler, run, state = _setup()
  keys = jax.random.split(jax.random.key(1), 40)
  full = run(state, keys)
  half = run(state, keys[:17])  # a (PT) solve is in flight after step 17
  assert int(half.sampler.pending.due) > 17
  checkpoint.save(tmp_path / "ckpt", half, sampler)
  restored = checkpoint.restore(tmp_path / "ckpt", state, sampler)
  resumed = run(restored, keys[17:])
  assert int(full.sampler.diagnostics.pt_solves) >= 3
  jax.tree.map(np.testing.assert_array_equal, resumed, full)


def test_mismatched_checkpoints_are_refused(tmp_path):
  sampler, run, state = _setup()
  checkpoint.save(tmp_path / "ckpt", state, sampler)
  other_n, _, other_n_state = _setup(n=N + 8)
  with pytest.raises(ValueError, match=f"n = {N} examples; this sampler has n = {N + 8}"):
    checkpoint.restore(tmp_path / "ckpt", other_n_state, other_n)
  other_k, _, other_k_state = _setup(classes=CLASSES + 1)
  with pytest.raises(ValueError, match="written for features"):
    checkpoint.restore(tmp_path / "ckpt", other_k_state, other_k)
  other_model, _, other_model_state = _setup(hidden=24)
  with pytest.raises(ValueError, match="does not match the structure or shapes"):
    checkpoint.restore(tmp_path / "ckpt", other_model_state, other_model)
  meta = tmp_path / "ckpt" / checkpoint.METADATA
  meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
  with pytest.raises(ValueError, match="format version 99"):
    checkpoint.restore(tmp_path / "ckpt", state, sampler)
  meta.unlink()
  with pytest.raises(ValueError, match="not a rais_jax checkpoint"):
    checkpoint.restore(tmp_path / "ckpt", state, sampler)


def test_model_state_is_saved_and_resumed_bit_identically(tmp_path):
  """A stateful model (BatchNorm statistics, dropout keys, augmentation) on
  the per-step API: the checkpoint holds the model state; resuming from it
  continues bit-identically."""
  from rais_jax.experiments.models import BatchNorm, stateful  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden, self.bn = nnx.Linear(16, 8, rngs=rngs), BatchNorm(8)
      self.drop, self.out = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(8, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x.reshape(len(x), -1))))))

  rng = np.random.default_rng(0)
  labels = rng.integers(0, CLASSES, 64)
  data = {"x": jnp.asarray(rng.normal(size=(64, 4, 4)), jnp.float32),
          "label": jnp.asarray(labels, jnp.int32)}
  model, params, model_state = stateful(Net(nnx.Rngs(0)))
  sampler = rj.rais_sampler(rj.default_features(labels, CLASSES), batch_size=8,
                            buffer_size=32)
  opt = rj.rais_sgd(0.05, momentum=0.9)
  step = rj.make_train_step(model, rj.softmax_cross_entropy_head(), opt, sampler,
                            augment=rj.augment.horizontal_flip())
  run = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: step(c, kk, data), s, k)[0])
  state = rj.init_train_state(params, opt, sampler, model_state)
  keys = jax.random.split(jax.random.key(1), 12)
  full, half = run(state, keys), run(state, keys[:5])
  checkpoint.save(tmp_path / "ckpt", half, sampler)
  restored = checkpoint.restore(tmp_path / "ckpt", state, sampler)
  jax.tree.map(np.testing.assert_array_equal, restored.model_state, half.model_state)
  jax.tree.map(np.testing.assert_array_equal, run(restored, keys[5:]), full)
  assert not np.array_equal(jax.tree.leaves(full.model_state)[0],
                            jax.tree.leaves(model_state)[0])
