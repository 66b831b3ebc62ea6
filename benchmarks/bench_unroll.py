"""The fast path's step time with the block's steps in a loop and unrolled,
on the ResNet (Fashion-MNIST shapes, crop + flip), U-SGD and RAIS (exact
and proxy norms).

    python benchmarks/bench_unroll.py [--block-size 8] [--out unroll_resnet]

XLA:CPU runs convolutions inside a loop body several times slower than
outside one (jax-ml/jax#12868); ``make_runner(unroll=True)`` avoids the
loop. Each configuration runs ``--repeats`` calls of two blocks after one
warm-up call (compilation), round-robin with the others; medians of ms per
step. n = 4096 training images.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments import data as data_lib
from rais_jax.experiments.models import ResNet, stateful

from common import carried, interleaved_medians, write  # pylint: disable=g-bad-import-order


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--block-size", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="unroll_resnet")
  args = p.parse_args(argv)
  n, m, k = 4096, args.batch_size, args.block_size
  raw = data_lib.load_dataset("fashion-mnist")
  data = {"x": jnp.asarray(raw["x_train"][:n]), "label": jnp.asarray(raw["y_train"][:n])}
  labels = np.asarray(raw["y_train"][:n])
  model, params, model_state = stateful(ResNet((28, 28), 10, rngs=nnx.Rngs(0)))
  head = rj.softmax_cross_entropy_head()
  augment = rj.augment.chain(rj.augment.random_crop(2), rj.augment.horizontal_flip())
  rais = lambda: rj.rais_sampler(rj.default_features(labels, 10), batch_size=m)
  samplers = {"usgd": (lambda: rj.uniform_sampler(n, batch_size=m), None),
              "rais": (rais, "exact"), "rais proxy": (rais, "proxy")}
  calls, compile_s, runners = {}, {}, []
  for name, (make, norms) in samplers.items():
    for unroll in (False, True):
      runner = rj.make_runner(model, head, rj.rais_sgd(0.05, momentum=0.9), make(),
                              norms=norms, block_size=k, augment=augment, unroll=unroll)
      runners.append(runner)
      label = f"{name}, {'unrolled' if unroll else 'loop'}"
      start = time.perf_counter()
      state = jax.block_until_ready(runner.run(runner.init(params, model_state),
                                               jax.random.key(0), data, 2 * k)[0])
      compile_s[label] = time.perf_counter() - start
      calls[label] = carried(
          lambda s, r=runner: r.run(s, jax.random.key(1), data, 2 * k)[0], state)
  times = interleaved_medians(calls, repeats=args.repeats, warmup=1)
  for runner in runners:
    runner.close()
  rows = [{"method, block": label, "ms_per_step": 1e3 * t / (2 * k),
           "first_call_s": compile_s[label]} for label, t in times.items()]
  for name in samplers:
    loop, unrolled = times[f"{name}, loop"], times[f"{name}, unrolled"]
    rows.append({"method, block": f"{name}: loop / unrolled", "ms_per_step": loop / unrolled,
                 "first_call_s": float("nan")})
  for name in list(samplers)[1:]:
    rows.append({"method, block": f"{name} / usgd, unrolled",
                 "ms_per_step": times[f"{name}, unrolled"] / times["usgd, unrolled"],
                 "first_call_s": float("nan")})
  print(write(args.out, rows, ["method, block", "ms_per_step", "first_call_s"],
              f"ResNet (8/16/32, BatchNorm) fast-path step, m = {m}, K = {k}, crop + "
              "flip: the block's steps in a loop vs unrolled (medians; the ratio rows "
              "are loop / unrolled, and RAIS / U-SGD unrolled)"))


if __name__ == "__main__":
  main()
