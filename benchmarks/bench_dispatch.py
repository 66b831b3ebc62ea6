"""Where the fast path's time goes between device, host dispatch and (PT).

    python benchmarks/bench_dispatch.py [--in-features 40 --hidden 256 256 --batch-size 64 --n 8000 --block-size 25]

Per step, one (PT) period of P steps per timed call (round-robin, medians):
the plain optax scan of P steps; U-SGD and RAIS (exact norms, async (PT))
driven three ways: :meth:`Runner.run` (with the period work), the period's
blocks as one program (:meth:`Runner.blocks`) and the same blocks as one
program each (keys made beforehand). Run-vs-program is the period work and
the host's part; program-vs-blocks is what a dispatch per block costs. Then,
from a profiler trace of the one-program variants, the device's kernels per
step and busy time per step (accelerators only: on the CPU the programs run
on host threads), and the (PT) solves of a RAIS run as the solve service sees
them (ms, iterations): on an accelerator an asynchronous run waits whenever a
solve takes longer than a period of steps.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import rais_jax as rj

from common import (RESULTS, carried,  # pylint: disable=g-bad-import-order
                    interleaved_medians, parse_mlp_arguments, plain_sgd_step,
                    synthetic_mlp_problem, write)


def device_trace(fn, calls: int) -> tuple[float, float]:
  """(kernels, busy µs) per call of ``fn`` on the accelerator, from a trace
  (NaN on the CPU, whose programs run on host threads)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn())
    events = json.load(gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz",
                                           recursive=True)[0]))["traceEvents"]
  names = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  on_device = [e for e in events if e.get("ph") == "X"
               and any(tag in names.get(e["pid"], "") for tag in ("GPU", "TPU"))]
  if not on_device:
    return float("nan"), float("nan")
  return len(on_device) / calls, sum(e["dur"] for e in on_device) / calls


def main(argv=None):
  args = parse_mlp_arguments(argv, repeats=9)
  n, m, k = args.n, args.batch_size, args.block_size
  data, labels, model_fn, params, size = synthetic_mlp_problem(args)
  head = rj.softmax_cross_entropy_head()
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  samplers = {
      "U-SGD": (lambda: rj.uniform_sampler(n, batch_size=m), None),
      "RAIS exact async": (lambda: rj.rais_sampler(
          rj.default_features(labels, 10), batch_size=m, pt_mode="async"), "exact"),
  }
  runners = {name: rj.make_runner(model_fn, head, rj.rais_sgd(0.01, momentum=0.9),
                                  make(), norms=norms, block_size=k)
             for name, (make, norms) in samplers.items()}
  period = runners["RAIS exact async"].pt_period
  blocks = period // k

  sgd = optax.sgd(0.01, momentum=0.9)

  plain_step = functools.partial(plain_sgd_step(model_fn, head, sgd, m, n), data=data)
  plain = jax.jit(lambda c, key: jax.lax.scan(plain_step, c, jax.random.split(key, period))[0],
                  donate_argnums=0)
  variants = {"plain optax scan": carried(lambda c: plain(c, jax.random.key(3)),
                                          copy((params, sgd.init(params))))}
  keys = [jax.random.key(i) for i in range(blocks)]
  for name, runner in runners.items():
    state = runner.init(params)
    state, _ = runner.run(state, jax.random.key(1), data, 2 * period)  # fitted
    key = jax.random.key(2)
    one = runner.compiled.blocks
    each = jax.jit(runner.programs.steps, donate_argnums=0)

    def per_block(s, each=each):
      for kk in keys:
        s, _ = each(s, kk, data)
      return s
    variants[f"{name}: run()"] = carried(
        lambda s, r=runner: r.run(s, key, data, period)[0], copy(state))
    variants[f"{name}: one program per period"] = carried(
        lambda s, one=one: one(s, key, data, num_blocks=blocks)[0], copy(state))
    variants[f"{name}: one program per block"] = carried(per_block, copy(state))

  medians = interleaved_medians(variants, repeats=args.repeats)
  base = medians["plain optax scan"]
  traced = ("plain optax scan", "U-SGD: one program per period",
            "RAIS exact async: one program per period")
  rows = []
  for name, t in medians.items():
    kernels, busy = device_trace(variants[name], 3) if name in traced else (
        float("nan"), float("nan"))
    rows.append({"variant": name, "µs/step": t / period * 1e6, "ratio": t / base,
                 "kernels/step": kernels / period, "device busy µs/step": busy / period})

  # The (PT) solves of a RAIS run, timed where the service runs them.
  runner = runners["RAIS exact async"]
  solves, solve = [], runner.service._solve  # pylint: disable=protected-access

  def timed(*a):
    start = time.perf_counter()
    out = jax.block_until_ready(solve(*a))
    solves.append((time.perf_counter() - start, int(out[2].iterations)))
    return out
  runner.service._solve = timed  # pylint: disable=protected-access
  state = runner.init(params)
  with runner:
    jax.block_until_ready(runner.run(state, jax.random.key(4), data, 8 * period))
  ms = sorted(t * 1e3 for t, _ in solves[1:])  # the first one compiles
  its = sorted(i for _, i in solves[1:])
  period_ms = medians["RAIS exact async: one program per period"] * 1e3
  note = (f"(PT) solves of a RAIS run ({len(ms)} after the first): "
          f"{ms[0]:.1f}–{ms[-1]:.1f} ms, median {ms[len(ms) // 2]:.1f}; iterations "
          f"{its[0]}–{its[-1]}; a period of blocks takes {period_ms:.1f} ms.")
  name = args.name or f"dispatch_{size}_m{m}"
  md = write(name, rows,
             ["variant", "µs/step", "ratio", "kernels/step", "device busy µs/step"],
             f"Device, dispatch and (PT): MLP {size}, m={m}, n={n}, K={k}, "
             f"P={period} steps per call, median of {args.repeats}")
  with open(RESULTS / f"{name}.md", "a", encoding="utf-8") as f:
    f.write("\n" + note + "\n")
  results = json.loads((RESULTS / f"{name}.json").read_text())
  results["pt_solves"] = {"ms": ms, "iterations": its, "period_ms": period_ms}
  (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))
  print(md + "\n" + note)


if __name__ == "__main__":
  main()
