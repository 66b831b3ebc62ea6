"""Shared helpers for the benchmarks: timing, JSON and markdown output."""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time
from typing import Callable

import jax

RESULTS = pathlib.Path(__file__).parent / "results"


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
