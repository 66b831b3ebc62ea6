"""rais_jax.experiments.models: the example models and functional()."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments.models import functional


class _BatchNormMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(6, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.norm(self.dense(x))))


def test_functional_keeps_non_param_state():
  """A model with BatchNorm (running statistics are BatchStat, not Param):
  params hold only the Params, the statistics are kept and used as they are,
  and RAIS trains it with ghost norms."""
  module = _BatchNormMLP(nnx.Rngs(0))
  module.norm.mean[...] = jnp.full((16,), 0.5)  # non-trivial statistics
  module.norm.var[...] = jnp.full((16,), 4.0)
  model_fn, params = functional(module)
  assert all(isinstance(v, nnx.Param) for v in
             jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)), jnp.float32)
  np.testing.assert_allclose(model_fn(params, {"x": x}), module(x), rtol=1e-6)
  labels = np.arange(32) % 3
  data = {"x": x, "label": jnp.asarray(labels, jnp.int32)}
  runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(),
                          rj.rais_sgd(0.05, momentum=0.9),
                          rj.rais_sampler(rj.default_features(labels, 3), batch_size=8,
                                          pt_mode="sync"), block_size=2)
  with runner:
    state, metrics = runner.run(runner.init(params), jax.random.key(0), data, 16)
  assert np.isfinite(np.asarray(metrics.loss)).all() and int(state.skipped_steps) == 0
