"""Cost of exact norms on the stateful models: the ResNet (BatchNorm in
training mode, its norms the per-example shares of the gradient) and the MLP
with dropout, on Fashion-MNIST-shaped inputs.

    python benchmarks/bench_norms_stateful.py [--batch-sizes 128] [--out norms_stateful]

Two jitted functions are timed round-robin in one process (medians):

* plain: ``jax.value_and_grad`` of the training-mode mean loss, with the new
  model state (what a U-SGD step computes);
* ghost: :func:`rais_jax.measure.measured_gradient_stateful` with exact norms
  (the same gradient and model state, the losses and all m norms).

Also XLA's cost analysis of each compiled function (flops and bytes
accessed), and with ``--profile`` a JAX profiler trace of ``--profile-calls``
calls of each, its XLA operations' times summed by operation kind
(results/OUT_profile.md): where the extra time goes. Goal (issue 27):
ghost/plain ≤ 1.25 on the ResNet at m = 128.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments.models import make_model, stateful
from rais_jax.measure import measured_gradient_stateful

from common import interleaved_medians, write  # pylint: disable=g-bad-import-order

MODELS = {"resnet": dict(name="resnet", dropout=0.0),
          "resnet-dropout": dict(name="resnet", dropout=0.1),
          "mlp-dropout": dict(name="mlp", dropout=0.1)}


def _cost(compiled) -> tuple[float, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get("flops", np.nan)), float(cost.get("bytes accessed", np.nan))


def _profile(fn, calls: int) -> dict[str, float]:
  """Milliseconds per call of each kind of XLA operation (the trace's event
  names without their numeric suffixes), from a perfetto trace."""
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    for _ in range(calls):
      jax.block_until_ready(fn())
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(tmp).rglob("perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      kind = re.sub(r"[.\d]+$", "", e.get("name", "?"))
      totals[kind] += e["dur"] / 1e3 / calls
  return dict(totals)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--models", nargs="+", default=list(MODELS))
  p.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
  p.add_argument("--repeats", type=int, default=15)
  p.add_argument("--out", default="norms_stateful")
  p.add_argument("--profile", action="store_true")
  p.add_argument("--profile-calls", type=int, default=10)
  args = p.parse_args(argv)
  profiles = []
  head = rj.softmax_cross_entropy_head()
  rows = []
  for name in args.models:
    spec = MODELS[name]
    model, params, state = stateful(make_model(
        spec["name"], (28, 28), 10, hidden=(256, 256), dropout=spec["dropout"],
        rngs=nnx.Rngs(0)))
    for m in args.batch_sizes:
      k1, k2 = jax.random.split(jax.random.key(0))
      batch = {"x": jax.random.normal(k1, (m, 28, 28)),
               "label": jax.random.randint(k2, (m,), 0, 10)}
      weights = jnp.ones((m,), jnp.float32)
      key = jax.random.key(1)

      def plain(p, s, b):
        def loss(q):
          out, new = model.apply(q, s, b, key, True)
          return head(out, b).mean(), new
        return jax.value_and_grad(loss, has_aux=True)(p)

      def ghost(p, s, b):
        return measured_gradient_stateful(model, head, p, s, key, b, weights,
                                          norms="exact", coupled=name.startswith("resnet"))

      compiled = {k: jax.jit(f).lower(params, state, batch).compile()
                  for k, f in (("plain", plain), ("ghost", ghost))}
      times = interleaved_medians({k: (lambda c=c: c(params, state, batch))
                                   for k, c in compiled.items()}, repeats=args.repeats)
      (pf, pb), (gf, gb) = _cost(compiled["plain"]), _cost(compiled["ghost"])
      if args.profile:
        kinds = {k: _profile(lambda c=c: c(params, state, batch), args.profile_calls)
                 for k, c in compiled.items()}
        for kind in sorted(set(kinds["plain"]) | set(kinds["ghost"]),
                           key=lambda x: -kinds["ghost"].get(x, 0))[:15]:
          profiles.append({"model": name, "m": m, "operation": kind,
                           "plain_ms": kinds["plain"].get(kind, 0.0),
                           "ghost_ms": kinds["ghost"].get(kind, 0.0)})
      rows.append({"model": name, "m": m, "plain_ms": 1e3 * times["plain"],
                   "ghost_ms": 1e3 * times["ghost"],
                   "ghost/plain": times["ghost"] / times["plain"],
                   "flops ghost/plain": gf / pf, "bytes ghost/plain": gb / pb})
      print(rows[-1], flush=True)
  md = write(args.out, rows, ["model", "m", "plain_ms", "ghost_ms", "ghost/plain",
                              "flops ghost/plain", "bytes ghost/plain"],
             "Exact norms on stateful models: ghost vs a plain training-mode gradient "
             "(jitted, interleaved medians)")
  print(md)
  if profiles:
    print(write(args.out + "_profile", profiles,
                ["model", "m", "operation", "plain_ms", "ghost_ms"],
                "Where the time goes: XLA operations by kind, ms per call summed over "
                "the trace (the 15 largest in the ghost pass per model)"))


if __name__ == "__main__":
  main()
