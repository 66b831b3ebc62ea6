"""Sampler step time as n grows: sum-tree vs ``jax.random.choice``.

    python benchmarks/bench_sampler.py

One "step" is what RAIS does per training step outside the model: draw m
indices with their probabilities, then update the sampled examples' features
and sum-tree leaves (``Sampler.sample`` + ``Sampler.update``, the per-step
path). The fast path's column is the same work done once per block of K steps
(``Sampler.draw`` of K·m indices + ``Sampler.fold_in`` of K·m
measurements), divided by K. The reference
draws the same m indices with ``jax.random.choice(p=...)`` over the O(n)
probability vector, which changes at the sampled entries every step (as RAIS's
does), so its O(n) cumulative sum cannot be hoisted out of the loop. Steps run inside one jitted ``lax.scan``; medians of
interleaved repeats.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import rais_jax as rj

from common import carried, interleaved_medians, write  # pylint: disable=g-bad-import-order


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[60_000, 1_000_000, 10_000_000])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--block-size", type=int, default=32)
  args = p.parse_args(argv)
  m, k = args.batch_size, args.steps
  rows = []
  for n in args.sizes:
    rng = np.random.default_rng(0)
    fmap = rj.default_features(rng.integers(0, 10, n).astype(np.int32), 10)
    # No (PT) inside the timed window: this measures sampling and updates.
    sampler = rj.rais_sampler(fmap, batch_size=m, pt_period=10**9, pt_mode="sync")
    state = sampler.init()
    state = state.replace(features=fmap.update(
        state.features, jnp.arange(n), jnp.asarray(rng.lognormal(0, 1, n), jnp.float32),
        jnp.ones((n,), bool)))
    d_r = fmap.num_features
    state = sampler.set_parameters(state, jnp.full((d_r,), 0.5), jnp.full((d_r,), 0.1))
    keys = jax.random.split(jax.random.key(0), k)

    def body(st, key):
      s = sampler.sample(st, key)
      st = sampler.fold_in(st, s, s.probs * n)
      return st, None

    # The state is donated and carried from run to run, as in a training loop
    # (without donation every call would copy the O(n) state once).
    tree_run = jax.jit(lambda st: jax.lax.scan(body, st, keys)[0], donate_argnums=0)

    def choice_body(p, key):
      # The reference must redo its O(n) work every step: p changes at the m
      # sampled entries, as RAIS's distribution does.
      idx = jax.random.choice(key, n, (m,), p=p)
      return p.at[idx].multiply(1.0 + 1e-6), None

    choice_run = jax.jit(lambda p: jax.lax.scan(choice_body, p, keys)[0],
                         donate_argnums=0)
    block = args.block_size

    def block_body(st, key):
      drawn = sampler.draw(st, key, (block, m))
      return sampler.fold_in(st, drawn, drawn.probs * n), None

    block_keys = keys[:max(1, k // block)]
    block_run = jax.jit(lambda st: jax.lax.scan(block_body, st, block_keys)[0],
                        donate_argnums=0)
    robust = state
    t = interleaved_medians(
        {"tree": carried(tree_run, state),
         "choice": carried(choice_run, sampler.probabilities(state)),
         "block": carried(block_run, jax.tree.map(jnp.copy, robust))},
        repeats=args.repeats)
    block_steps = len(block_keys) * block
    rows.append({"n": n, "sum-tree sample+update (ms)": t["tree"] / k * 1e3,
                 f"block of K={block}: per step (ms)": t["block"] / block_steps * 1e3,
                 "random.choice sample (ms)": t["choice"] / k * 1e3,
                 "speed-up": t["choice"] / t["tree"]})
    print(rows[-1], flush=True)
  base = rows[0]["sum-tree sample+update (ms)"]
  for r in rows:
    r["t(n) / t(n_min)"] = r["sum-tree sample+update (ms)"] / base
  md = write("sampler", rows, ["n", "sum-tree sample+update (ms)",
                               f"block of K={args.block_size}: per step (ms)",
                               "random.choice sample (ms)", "speed-up", "t(n) / t(n_min)"],
             f"Sampler step, m={m}, {k} steps per scan, median of {args.repeats}")
  print(md)


if __name__ == "__main__":
  main()
