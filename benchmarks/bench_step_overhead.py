"""One RAIS step vs one plain optax SGD step on the same MLP and data.

    python benchmarks/bench_step_overhead.py

Each variant runs K steps inside one jitted ``lax.scan`` (so dispatch overhead
is excluded); variants are timed round-robin in one process, medians reported.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rais_jax as rj
from rais_jax.models import MLP, functional

from common import interleaved_medians, write  # pylint: disable=g-bad-import-order


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--n", type=int, default=60_000)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--in-features", type=int, default=784)
  p.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
  p.add_argument("--steps", type=int, default=None,
                 help="steps per timed scan; default one (PT) period ⌈|D|/m⌉, so "
                 "each timed scan contains exactly one solve submission and delivery")
  p.add_argument("--repeats", type=int, default=7)
  args = p.parse_args(argv)
  n, m = args.n, args.batch_size
  k = args.steps or -(-min(n, 65536) // m)
  rng = np.random.default_rng(0)
  data = {"x": jnp.asarray(rng.normal(size=(n, args.in_features)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
  model_fn, params = functional(MLP(args.in_features, args.hidden, 10, rngs=nnx.Rngs(0)))
  head = rj.softmax_cross_entropy_head()
  keys = jax.random.split(jax.random.key(0), k)

  # Plain optax SGD: uniform indices, mean loss, optax.sgd with momentum.
  sgd = optax.sgd(0.01, momentum=0.9)

  def plain_step(carry, key):
    params, opt_state = carry
    idx = jax.random.randint(key, (m,), 0, n)
    batch = jax.tree.map(lambda x: x[idx], data)
    grads = jax.grad(lambda p_: head(model_fn(p_, batch), batch).mean())(params)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  plain = jax.jit(lambda c: jax.lax.scan(plain_step, c, keys)[0])
  plain_state = (params, sgd.init(params))

  variants = {"optax sgd": lambda: plain(plain_state)}
  samplers = {
      "U-SGD (rais_jax loop)": (rj.uniform_sampler(n, batch_size=m), None),
      "RAIS, proxy norms, async (PT)": (rj.rais_sampler(
          rj.default_features(np.asarray(data["label"]), 10), batch_size=m,
          scale_free=True), "proxy"),
      "RAIS, proxy norms, sync (PT)": (rj.rais_sampler(
          rj.default_features(np.asarray(data["label"]), 10), batch_size=m,
          scale_free=True, pt_mode="sync"), "proxy"),
      "RAIS, exact (ghost) norms, async (PT)": (rj.rais_sampler(
          rj.default_features(np.asarray(data["label"]), 10), batch_size=m),
          "exact"),
  }
  for name, (sampler, norms) in samplers.items():
    opt = rj.rais_sgd(0.01, momentum=0.9)
    step = rj.make_train_step(model_fn, head, opt, sampler, norms=norms)
    run = jax.jit(lambda s, d, step=step: jax.lax.scan(lambda c, kk: step(c, kk, d), s, keys)[0])
    state = rj.init_train_state(params, opt, sampler)
    if name.startswith("RAIS"):
      # Start from a fitted sampler (two periods in) so every timed step
      # samples from the trees.
      state = run(run(state, data), data)
      jax.block_until_ready(state)
      assert bool(state.sampler.fitted)
    variants[name] = (lambda run=run, state=state: run(state, data))

  medians = interleaved_medians(variants, repeats=args.repeats)
  base = medians["optax sgd"]
  rows = [{"variant": name, "ms/step": t / k * 1e3, "ratio vs optax sgd": t / base}
          for name, t in medians.items()]
  md = write("step_overhead", rows, ["variant", "ms/step", "ratio vs optax sgd"],
             f"Step time, MLP {args.in_features}-{'-'.join(map(str, args.hidden))}-10, "
             f"m={m}, n={n}, {k} steps per scan, median of {args.repeats}")
  print(md)


if __name__ == "__main__":
  main()
