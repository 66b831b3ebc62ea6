"""Data-parallel RAIS over a 4-device mesh (simulated CPU devices) matches one
device. JAX fixes its device count at start-up, so this runs in a subprocess."""

import os
import pathlib
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import rais_jax as rj
    from rais_jax.experiments.models import MLP, functional

    assert jax.device_count() == 4, jax.devices()
    n, m, K = 256, 32, 4
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, n)
    data = {"x": jnp.asarray(rng.normal(size=(n, 8)) + labels[:, None], jnp.float32),
            "label": jnp.asarray(labels, jnp.int32)}
    model_fn, params = functional(MLP(8, [32], K, rngs=nnx.Rngs(0)))
    mesh = Mesh(np.array(jax.devices()), ("data",))

    def build(norms, sharding):
      sampler = rj.rais_sampler(rj.default_features(labels, K), batch_size=m,
                                buffer_size=64,
                                pt_mode="sync")
      opt = rj.rais_sgd(0.05, momentum=0.9)
      step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt,
                                sampler, norms=norms, batch_sharding=sharding)
      run = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: step(c, kk, data), s, k)[0])
      return run, rj.init_train_state(params, opt, sampler)

    async_sampler = rj.rais_sampler(rj.default_features(labels, K), batch_size=m)
    try:
      rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.1),
                         async_sampler, batch_sharding=NamedSharding(mesh, P("data")))
      raise AssertionError("an async sampler over 4 devices was accepted")
    except ValueError as e:
      assert "pt_mode='sync'" in str(e), e

    keys = jax.random.split(jax.random.key(0), 21)
    for norms in ("proxy", "exact"):
      one, state = build(norms, None)
      warm = one(state, keys[:20])  # a fitted sampler after several (PT) solves
      assert int(warm.sampler.diagnostics.pt_solves) >= 5
      four, _ = build(norms, NamedSharding(mesh, P("data")))
      hlo = jax.jit(four).lower(warm, keys[20:]).as_text()
      assert "num_partitions = 4" in hlo, "the step is not partitioned over 4 devices"
      a, b = one(warm, keys[20:]), four(warm, keys[20:])
      # Float tolerance: the trees hold sums of thousands of terms.
      jax.tree.map(lambda x, y: np.testing.assert_allclose(
          np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-5), a, b)

    # A stateful model: BatchNorm in training mode (its statistics over the
    # whole batch, across the devices) and dropout (keyed by the step).
    from rais_jax.experiments.models import BatchNorm, stateful

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.hidden, self.bn = nnx.Linear(8, 16, rngs=rngs), BatchNorm(16)
        self.drop, self.out = nnx.Dropout(0.2, rngs=rngs), nnx.Linear(16, K, rngs=rngs)

      def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x)))))

    model, net_params, model_state = stateful(Net(nnx.Rngs(0)))
    runs = []
    for sharding in (None, NamedSharding(mesh, P("data"))):
      sampler = rj.rais_sampler(rj.default_features(labels, K), batch_size=m,
                                buffer_size=64, pt_mode="sync")
      opt = rj.rais_sgd(0.05, momentum=0.9)
      step = rj.make_train_step(model, rj.softmax_cross_entropy_head(), opt, sampler,
                                batch_sharding=sharding)
      runs.append(jax.jit(lambda s, k: jax.lax.scan(
          lambda c, kk: step(c, kk, data), s, k)[0]))
    # From one fitted state (a run's draws part ways at the first rounding
    # difference), one step on one device and on four.
    warm = runs[0](rj.init_train_state(net_params, opt, sampler, model_state), keys[:20])
    assert int(warm.sampler.diagnostics.pt_solves) >= 5
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-5),
                 runs[0](warm, keys[20:]), runs[1](warm, keys[20:]))
    print("MESH OK")
''')


def test_one_step_on_four_devices_matches_one_device():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0 and "MESH OK" in result.stdout, result.stderr[-3000:]


RUNNER_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import rais_jax as rj
    from rais_jax.experiments.models import MLP, functional

    assert jax.device_count() == 4, jax.devices()
    n, m, C = 256, 32, 4
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, n)
    data = {"x": jnp.asarray(rng.normal(size=(n, 8)) + labels[:, None], jnp.float32),
            "label": jnp.asarray(labels, jnp.int32)}
    model_fn, params = functional(MLP(8, [32], C, rngs=nnx.Rngs(0)))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())

    def run(mode, sharding, steps=40):
      sampler = rj.rais_sampler(rj.default_features(labels, C), batch_size=m,
                                buffer_size=128, pt_mode=mode)
      runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(),
                              rj.rais_sgd(0.05, momentum=0.9), sampler,
                              norms="exact", block_size=2, batch_sharding=sharding)
      state = runner.init(params)
      d = data
      if sharding is not None:
        state, d = jax.device_put((state, data), replicated)
      with runner:
        state, metrics = runner.run(state, jax.random.key(0), d, steps)
      return jax.device_get((state, metrics))

    four_async = run("async", NamedSharding(mesh, P("data")))
    four_sync = run("sync", NamedSharding(mesh, P("data")))
    diag = four_async[0].sampler.diagnostics
    assert int(diag.pt_solves) >= 5 and int(diag.pt_failures) == 0, diag
    jax.tree.map(np.testing.assert_array_equal, four_async, four_sync)
    # One block on 4 devices against 1 device: equal to float tolerance
    # (longer runs drift apart: sampling amplifies last-bit differences).
    one = run("sync", None, steps=2)
    four = run("sync", NamedSharding(mesh, P("data")), steps=2)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=1e-5),
        one, four)
    print("RUNNER MESH OK")
''')


def test_fast_path_async_on_four_devices():
  """The fast path's (PT) solves run outside the SPMD program: asynchronous
  (PT) works over 4 devices, bit-identical to sync, close to one device."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", RUNNER_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0 and "RUNNER MESH OK" in result.stdout, result.stderr[-3000:]
