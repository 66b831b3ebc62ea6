"""Cost of exact per-example gradient norms relative to a plain gradient.

    python benchmarks/bench_norms.py [--models mlp cnn ...] [--batch-sizes 32 128 512] [--out norms]

For every model of :mod:`rais_jax.testing.zoo` (``size="bench"``) and batch size m,
three jitted functions are timed round-robin in one process (medians of at
least --repeats rounds, more for fast calls):

* plain: ``jax.value_and_grad`` of the mean loss (what SGD computes anyway);
* ghost: ``rais_jax.value_grad_and_norms`` (losses, the same gradient and all
  m exact norms, method "ghost");
* vmap: ``value_grad_and_norms(method="vmap")`` (the same outputs: the
  gradient by one backward pass, the norms by vmap of per-example gradients),
  timed for m ≤ --vmap-max-m only, since it grows as m × the plain cost. It is
  timed in a second round against plain alone (after it, the caches are cold
  for whatever runs next), and its ratio is taken within that round;
* auto: what ``rais_jax.choose_method`` picks for that model and m (its own
  measurement, run in a fresh call each time), and whether that is the
  faster of ghost and vmap by this benchmark's timings ("ok"), within 10 %
  of it ("tie") or slower ("wrong").

Memory is XLA's compiled scratch (temporary) buffer size for each function,
``compiled.memory_analysis().temp_size_in_bytes``: the peak working memory
beyond inputs and outputs. Goals on CPU: ghost/plain ≤ 1.3 for dense models,
≤ 2 for convolution and attention models.
"""

from __future__ import annotations

import argparse
import warnings

import jax

import rais_jax as rj
from rais_jax.testing import zoo

from common import interleaved_medians, time_call, write  # pylint: disable=g-bad-import-order

GOALS = {"dense": 1.3, "conv": 2.0, "attention": 2.0}


def _scratch_mb(fn, *args) -> float:
  analysis = fn.lower(*args).compile().memory_analysis()
  return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=sorted(zoo.ZOO))
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 512])
  p.add_argument("--vmap-max-m", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="norms", help="results/OUT.json and .md")
  args = p.parse_args(argv)
  rows = []
  for name in args.models:
    for m in args.batch_sizes:
      problem = zoo.ZOO[name](m, "bench")
      loss_fn = problem.loss_fn
      fns = {
          "plain": jax.jit(lambda q, b: jax.value_and_grad(
              lambda p: loss_fn(p, b).mean())(q)),
          "ghost": jax.jit(lambda q, b: rj.value_grad_and_norms(loss_fn, q, b)),
      }
      if m <= args.vmap_max_m:
        fns["vmap"] = jax.jit(lambda q, b: rj.value_grad_and_norms(
            loss_fn, q, b, method="vmap"))
      inputs = (problem.params, problem.batch)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rnn's fallback warning
        memory = {k: _scratch_mb(f, *inputs) for k, f in fns.items()}
        # Millisecond calls are noisy here: repeat them for ~2 s of plain time.
        probe = time_call(lambda: fns["plain"](*inputs), repeats=3, warmup=1)
        repeats = max(args.repeats, min(41, int(2.0 / probe)))
        # Two rounds, each against its own plain baseline: interleaving the
        # memory-hungry vmap with the others would slow whichever follows it.
        call = lambda k: (lambda: fns[k](*inputs))
        times = interleaved_medians({k: call(k) for k in ("plain", "ghost")},
                                    repeats=repeats, warmup=1)
        vmap = None
        if "vmap" in fns:
          second = interleaved_medians({k: call(k) for k in ("plain", "vmap")},
                                       repeats=max(3, repeats // 4), warmup=1)
          vmap = second["vmap"] / second["plain"] * times["plain"]
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = rj.choose_method(loss_fn, *inputs)
      verdict = "—"
      if vmap:
        best = min(times["ghost"], vmap)
        chosen = times["ghost"] if auto == "ghost" else vmap
        verdict = ("ok" if chosen == best else
                   "tie" if chosen <= 1.1 * best else "wrong")
      goal = GOALS.get(problem.kind)
      row = {
          "model": name, "kind": problem.kind, "m": m, "repeats": repeats,
          "plain (ms)": 1e3 * times["plain"], "ghost (ms)": 1e3 * times["ghost"],
          "ghost / plain": times["ghost"] / times["plain"],
          "vmap / plain": vmap / times["plain"] if vmap else "—",
          "auto": auto, "auto is": verdict,
          "goal": goal if goal else "—",
          "scratch MB plain": memory["plain"], "ghost": memory["ghost"],
          "vmap": memory.get("vmap", "—"),
      }
      rows.append(row)
      print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
            flush=True)
  md = write(args.out, rows, list(rows[0]),
             "Exact per-example gradient norms: time and scratch memory vs a plain "
             "gradient (CPU)")
  print(md)


if __name__ == "__main__":
  main()
