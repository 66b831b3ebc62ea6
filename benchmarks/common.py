"""Shared helpers for the benchmarks: timing, JSON and markdown output."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

RESULTS = pathlib.Path(__file__).parent / "results"


def parse_mlp_arguments(argv, *, repeats: int,
                        more: Callable[[argparse.ArgumentParser], Any] = lambda p: None
                        ) -> argparse.Namespace:
  """The step benchmarks' flags (the synthetic MLP problem, K, repeats, name;
  ``more`` adds a benchmark's own), parsed from ``argv``."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=60_000)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--in-features", type=int, default=784)
  parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
  parser.add_argument("--block-size", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=repeats)
  parser.add_argument("--name", default=None, help="results file name")
  more(parser)
  return parser.parse_args(argv)


class MLPProblem(NamedTuple):
  data: dict  # {"x": (n, in_features) float32, "label": (n,) int32}
  labels: np.ndarray
  model_fn: Any
  params: Any
  size: str  # e.g. "784-512-512-10"


def synthetic_mlp_problem(args: argparse.Namespace) -> MLPProblem:
  """A learnable synthetic task (class centres plus noise, 10 classes), so that
  the measured norms mean something to (PT), as on real data; and an MLP."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rais_jax.experiments.models import MLP, functional  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, args.n)
  centres = rng.normal(size=(10, args.in_features))
  data = {"x": jnp.asarray(centres[labels] + 2.0 * rng.normal(size=(args.n, args.in_features)),
                           jnp.float32),
          "label": jnp.asarray(labels, jnp.int32)}
  model_fn, params = functional(MLP(args.in_features, args.hidden, 10, rngs=nnx.Rngs(0)))
  size = f"{args.in_features}-{'-'.join(map(str, args.hidden))}-10"
  return MLPProblem(data, labels, model_fn, params, size)


def plain_sgd_step(model_fn, loss_head, optimizer, batch_size: int,
                   num_examples: int) -> Callable[..., Any]:
  """The baseline the runners are timed against: ``step(carry, key, *, data,
  report_loss=False)``, one hand-written optax step on ``batch_size``
  uniform ``randint`` indices (mean loss), for a ``lax.scan`` over keys
  with carry (params, optimizer state)."""
  def step(carry, key, *, data, report_loss=False):
    params, opt_state = carry
    idx = jax.random.randint(key, (batch_size,), 0, num_examples)
    batch = jax.tree.map(lambda x: x[idx], data)
    loss, grads = jax.value_and_grad(
        lambda p_: loss_head(model_fn(p_, batch), batch).mean())(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), (
        loss if report_loss else None)
  return step


def carried(fn: Callable[[Any], Any], state: Any) -> Callable[[], Any]:
  """A call of ``fn`` that carries its state forward: each call runs
  ``state = fn(state)`` on the last result (for programs that donate it)."""
  box = [state]

  def call():
    box[0] = fn(box[0])
    return box[0]
  return call


def time_call(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
  """Median wall-clock seconds of ``fn()`` (blocked until ready)."""
  return interleaved_medians({"fn": fn}, repeats=repeats, warmup=warmup)["fn"]


def interleaved_medians(fns: dict[str, Callable[[], object]], *, repeats: int = 7,
                        warmup: int = 2) -> dict[str, float]:
  """Median seconds of each function, timed round-robin so drift hits all."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict:
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "machine": platform.machine()}


def write(name: str, rows: list[dict], columns: list[str], title: str) -> str:
  """Writes results/NAME.json and results/NAME.md; returns the markdown."""
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(
      {"environment": environment(), "rows": rows}, indent=1))
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = [f"### {title}", "", "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
  env = environment()
  lines += ["", f"jax {env['jax']}, backend {env['backend']}, {env['machine']}."]
  md = "\n".join(lines) + "\n"
  (RESULTS / f"{name}.md").write_text(md)
  return md
