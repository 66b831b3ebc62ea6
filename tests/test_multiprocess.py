"""RAIS across 2 processes (``jax.distributed`` on loopback, gloo CPU
collectives) agrees with a single-process run over the same 2-device mesh.

Each process owns one CPU device; the training set, parameters and sampler
state are replicated and the sampled batch is split over the two devices, as on
a multi-host slice. The reference process simulates the same mesh with
``--xla_force_host_platform_device_count=2``.
"""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]

WORKER = textwrap.dedent('''
    import sys
    import jax
    process_id, num_processes, port, out = sys.argv[1:]
    if int(num_processes) > 1:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                                 num_processes=int(num_processes),
                                 process_id=int(process_id),
                                 initialization_timeout=120)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    import rais_jax as rj
    from rais_jax.experiments.models import MLP, functional

    assert jax.device_count() == 2 and jax.process_count() == int(num_processes)
    n, m, K = 256, 32, 4
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, n)
    data = {"x": np.asarray(rng.normal(size=(n, 8)) + labels[:, None], np.float32),
            "label": np.asarray(labels, np.int32)}
    model_fn, params = functional(MLP(8, [32], K, rngs=nnx.Rngs(0)))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    results = {}
    for norms in ("proxy", "exact"):
      sampler = rj.rais_sampler(rj.default_features(labels, K), batch_size=m,
                                buffer_size=64,
                                pt_mode="sync")
      opt = rj.rais_sgd(0.05, momentum=0.9)
      step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), opt,
                                sampler, norms=norms,
                                batch_sharding=NamedSharding(mesh, P("data")))
      keys = jax.random.key_data(jax.random.split(jax.random.key(0), 12))
      # Every process passes the same values: global, replicated arrays.
      state, d, k = jax.device_put(
          (rj.init_train_state(params, opt, sampler), data, keys), replicated)
      run = jax.jit(lambda s, k, d: jax.lax.scan(
          lambda c, kk: step(c, jax.random.wrap_key_data(kk), d), s, k))
      state, metrics = run(state, k, d)
      local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)),
                           (state, metrics))
      assert int(local[0].sampler.diagnostics.pt_solves) >= 4
      for i, leaf in enumerate(jax.tree.leaves(local)):
        results[f"{norms}_{i}"] = leaf
    np.savez(out, **results)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args, env_extra=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def test_two_processes_agree_with_one(tmp_path):
  port = _free_port()
  procs = [_start([i, 2, port, tmp_path / f"p{i}.npz"]) for i in range(2)]
  procs.append(_start([0, 1, 0, tmp_path / "ref.npz"],
                      {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
  try:
    logs = [p.communicate(timeout=400)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  p0, p1, ref = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "ref.npz"))
  assert p0.files == ref.files and len(ref.files) > 40
  # Same program, same partitioning, same inputs: bit-identical, including the
  # sampler state after 12 steps with ≥ 4 (PT) solves.
  for name in ref.files:
    np.testing.assert_array_equal(p0[name], p1[name], err_msg=name)
    np.testing.assert_array_equal(p0[name], ref[name], err_msg=name)
