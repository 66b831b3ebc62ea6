"""RAIS-SGD vs plain SGD (and the O-SGD oracle) on MNIST-1D with a Flax NNX MLP.

    python examples/mnist1d_rais_vs_sgd.py --epochs 30 --out runs/mnist1d

Every method shares the model initialisation, the base learning-rate schedule
(RAIS indexes it by equivalent iterations τ), the batch size and the sampling
key sequence. After every epoch of steps it records the full training loss
(uniform weights), test loss and accuracy, wall-clock training time, epochs
equivalent and the gain ratio; it writes ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import rais_jax as rj
from rais_jax.data import load_mnist1d
from rais_jax.models import MLP, functional

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--num-samples", type=int, default=10_000,
                 help="MNIST-1D examples, train + test (80/20)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
  p.add_argument("--methods", default="usgd,rais",
                 help="comma-separated among usgd, rais, osgd")
  p.add_argument("--norms", choices=["proxy", "exact"], default="proxy",
                 help="how RAIS and O-SGD measure per-step norms")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="runs/mnist1d")
  return p.parse_args(argv)


def make_sampler(method: str, labels: np.ndarray, args) -> rj.Sampler:
  n, m = len(labels), args.batch_size
  if method == "usgd":
    return rj.uniform_sampler(n, batch_size=m)
  if method == "rais":
    return rj.rais_sampler(rj.default_features(labels, 10), batch_size=m,
                           scale_free=args.norms == "proxy")
  if method == "osgd":
    return rj.oracle_sampler(n, batch_size=m, scale_free=args.norms == "proxy")
  raise ValueError(f"unknown method {method!r}; use usgd, rais or osgd.")


def run_method(method: str, args, train, test, params0, model_fn) -> list[dict]:
  n, m = train["label"].shape[0], args.batch_size
  steps_per_epoch = n // m
  total_steps = args.epochs * steps_per_epoch
  schedule = optax.cosine_decay_schedule(args.lr, total_steps)
  optimizer = rj.rais_sgd(schedule, momentum=args.momentum)
  sampler = make_sampler(method, np.asarray(train["label"]), args)
  head = rj.softmax_cross_entropy_head()
  step = rj.make_train_step(model_fn, head, optimizer, sampler,
                            norms=None if method == "usgd" else args.norms)
  epoch_fn = jax.jit(
      lambda state, keys: jax.lax.scan(lambda s, k: step(s, k, train), state, keys))
  evaluate = jax.jit(lambda params, data: rj.evaluate(model_fn, head, params, data))

  state = rj.init_train_state(params0, optimizer, sampler)
  keys = jax.random.split(jax.random.key(args.seed), total_steps)
  keys = keys.reshape(args.epochs, steps_per_epoch)
  jax.block_until_ready(epoch_fn.lower(state, keys[0]).compile())  # warm-up
  jax.block_until_ready(evaluate(params0, train))

  curve, wall = [], 0.0
  for epoch in tqdm(range(args.epochs + 1), desc=method, leave=False):
    tr, te = evaluate(state.params, train), evaluate(state.params, test)
    curve.append({
        "epoch": epoch, "wall_clock_s": wall,
        "epochs_equivalent": float(rj.epochs_equivalent(state.opt_state, m, n)),
        "train_loss": float(tr["loss"]), "test_loss": float(te["loss"]),
        "test_accuracy": float(te["accuracy"]),
        "gain_ratio": float(sampler.gain_ratio(state.sampler)),
        "pt_solves": int(state.sampler.diagnostics.pt_solves),
        "pt_failures": int(state.sampler.diagnostics.pt_failures),
    })
    if epoch == args.epochs:
      break
    start = time.perf_counter()
    state, _ = epoch_fn(state, keys[epoch])
    jax.block_until_ready(state)
    wall += time.perf_counter() - start
  return curve


def plot(results: dict, path: pathlib.Path) -> None:
  fig, axes = plt.subplots(1, 4, figsize=(18, 4))
  for method, curve in results.items():
    get = lambda k: [p[k] for p in curve]  # pylint: disable=cell-var-from-loop
    axes[0].semilogy(get("epoch"), get("train_loss"), label=method)
    axes[1].semilogy(get("wall_clock_s"), get("train_loss"), label=method)
    axes[2].plot(get("epoch"), get("test_accuracy"), label=method)
    axes[3].plot(get("epoch"), get("gain_ratio"), label=method)
  for ax, (x, y) in zip(axes, [("epoch", "training loss"), ("wall-clock (s)", "training loss"),
                               ("epoch", "test accuracy"), ("epoch", "gain ratio r")]):
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
  args = parse_args(argv)
  raw = load_mnist1d(args.num_samples, seed=42)
  train = {"x": jnp.asarray(raw["x_train"]), "label": jnp.asarray(raw["y_train"])}
  test = {"x": jnp.asarray(raw["x_test"]), "label": jnp.asarray(raw["y_test"])}
  model_fn, params0 = functional(
      MLP(train["x"].shape[1], args.hidden, 10, rngs=nnx.Rngs(args.seed)))

  results = {}
  for method in args.methods.split(","):
    results[method] = run_method(method, args, train, test, params0, model_fn)
    last = results[method][-1]
    print(f"{method:5s} train loss {last['train_loss']:.4f}  test acc "
          f"{last['test_accuracy']:.4f}  wall {last['wall_clock_s']:.1f}s  "
          f"epochs-equivalent {last['epochs_equivalent']:.1f}  "
          f"r {last['gain_ratio']:.2f}")

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(
      {"config": vars(args), "curves": results}, indent=1))
  plot(results, out / "curves.png")
  print(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
  return results


if __name__ == "__main__":
  main()
