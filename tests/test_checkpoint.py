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
