"""Golden runs: every method on the fast path and the per-step API, recorded.

``python tests/golden.py --record`` writes ``tests/golden/runs.npz``;
``tests/test_golden.py`` recomputes the same runs and compares them with it.
Each run has fixed keys, a small MLP, a NaN example (so steps are skipped and
non-finite measurements counted), (PT) deliveries, and a resume from a state
the runner did not return (a host copy), then a continuation. What is stored:
the parameters, the optimizer state, every array of the sampler state (by
field name), the gain-ratio moments, the step and skipped-step counters, and
the metrics of every step.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import problems
import rais_jax as rj

GOLDEN = pathlib.Path(__file__).parent / "golden" / "runs.npz"
N, M, CLASSES, K = 120, 8, 4, 4
FAST_METHODS = ("usgd", "rais", "osgd", "naive", "loss-is", "selective-backprop",
                "infobatch")
PER_STEP_METHODS = ("usgd", "rais", "osgd")


def data_and_model():
  data, model_fn, params, labels = problems.classification(N, CLASSES)
  # One broken example: steps that draw it are skipped, its norms counted.
  data = dict(data, x=data["x"].at[7].set(jnp.nan))
  return data, model_fn, params, labels


def sampler(method: str, labels) -> Any:
  if method == "selective-backprop":
    return rj.baselines.selective_backprop(N, batch_size=M)
  if method == "infobatch":
    return rj.baselines.infobatch(N, batch_size=M, num_epochs=4)
  return problems.sampler(method, labels, CLASSES, M, buffer_size=48, mode="sync",
                          pt_delay=None)


def _norms(method: str):
  return "exact" if method in ("rais", "osgd", "naive") else None


def _flatten(prefix: str, tree: Any, out: dict[str, np.ndarray]) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = prefix + jax.tree_util.keystr(path)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[name] = np.asarray(leaf)


def fast_run(method: str) -> dict[str, np.ndarray]:
  data, model_fn, params, labels = data_and_model()
  runner = rj.make_runner(
      model_fn, rj.softmax_cross_entropy_head(), rj.rais_sgd(0.05, momentum=0.9),
      sampler(method, labels), norms=_norms(method), block_size=K, oracle_period=8)
  key = jax.random.key(3)
  out: dict[str, np.ndarray] = {}
  with runner:
    state = runner.init(params)
    parts = []
    if method == "infobatch":
      for _ in range(2):
        state, metrics = runner.run_epoch(state, key, data)
        parts.append(metrics)
      state = jax.device_put(jax.device_get(state))  # a state it did not return
      state, metrics = runner.run_epoch(state, key, data)
      parts.append(metrics)
    else:
      state, metrics = runner.run(state, key, data, 24)
      parts.append(metrics)
      state = jax.device_put(jax.device_get(state))  # a state it did not return
      for steps in (12, 12):
        state, metrics = runner.run(state, key, data, steps)
        parts.append(metrics)
  metrics = jax.tree.map(lambda *x: np.concatenate(x), *parts)
  record(state, metrics, out)
  return out


def per_step_run(method: str) -> dict[str, np.ndarray]:
  data, model_fn, params, labels = data_and_model()
  smp = sampler(method, labels)
  optimizer = rj.rais_sgd(0.05, momentum=0.9)
  step = rj.make_train_step(model_fn, rj.softmax_cross_entropy_head(), optimizer, smp,
                            norms=_norms(method), oracle_period=8)
  state = rj.init_train_state(params, optimizer, smp)
  keys = jax.random.split(jax.random.key(5), 30)
  state, metrics = jax.jit(lambda s, k: jax.lax.scan(
      lambda st, kk: step(st, kk, data), s, k))(state, keys)
  out: dict[str, np.ndarray] = {}
  record(state, metrics, out)
  return out


def record(state, metrics, out: dict[str, np.ndarray]) -> None:
  """What a run is compared by. Adapts to the state's layout, so that the
  same names cover the layout the runs were recorded with and later ones."""
  _flatten("params", state.params, out)
  _flatten("opt_state", state.opt_state, out)
  sampler_state = state.sampler
  moments = getattr(state, "moments", None)
  if moments is None:  # the per-step layout kept them in the sampler state
    moments = getattr(sampler_state, "moments", None)
  if moments is not None:
    _flatten("moments", moments, out)
  for name in sorted(vars(sampler_state)):
    if name in ("moments", "step"):
      continue
    _flatten(f"sampler.{name}", getattr(sampler_state, name), out)
  step = getattr(state, "step", None)
  if step is None:
    step = sampler_state.step
  out["step"] = np.asarray(step)
  out["skipped_steps"] = np.asarray(state.skipped_steps)
  for name, value in metrics._asdict().items():
    out[f"metrics.{name}"] = np.asarray(value)


def all_runs() -> dict[str, np.ndarray]:
  out = {}
  for method in FAST_METHODS:
    out |= {f"fast/{method}/{k}": v for k, v in fast_run(method).items()}
  for method in PER_STEP_METHODS:
    out |= {f"per_step/{method}/{k}": v for k, v in per_step_run(method).items()}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--record", action="store_true")
  args = parser.parse_args()
  runs = all_runs()
  if args.record:
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, jax_version=np.asarray(jax.__version__),
                        backend=np.asarray(jax.default_backend()), **runs)
    print(f"wrote {len(runs)} arrays to {GOLDEN}")


if __name__ == "__main__":
  main()
