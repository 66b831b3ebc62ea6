"""A RAIS step vs a plain optax SGD step on the same MLP and data.

    python benchmarks/bench_step_overhead.py [--in-features 40 --hidden 256 256 --batch-size 64 --n 8000]

Variants run one (PT) period of steps each (so every timed run contains one
solve submission and one delivery) and are timed round-robin in one process;
medians are reported, as ms per step and as a ratio to a hand-written plain
optax SGD ``lax.scan`` (uniform ``randint`` indices, mean loss,
``optax.sgd(momentum=0.9)``) that gets its step keys as an argument. The fast
path is :func:`rais_jax.make_runner` (blocks of K steps); the per-step API
:func:`rais_jax.make_train_step` is timed alongside for reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

import rais_jax as rj

from common import (carried, interleaved_medians,  # pylint: disable=g-bad-import-order
                    parse_mlp_arguments, plain_sgd_step, synthetic_mlp_problem, write)


def main(argv=None):
  args = parse_mlp_arguments(argv, repeats=7, more=lambda p: p.add_argument(
      "--no-per-step", action="store_true", help="skip the make_train_step variants"))
  n, m, k = args.n, args.batch_size, args.block_size
  data, labels, model_fn, params, size = synthetic_mlp_problem(args)
  head = rj.softmax_cross_entropy_head()
  rais = lambda mode: rj.rais_sampler(
      rj.default_features(labels, 10), batch_size=m, pt_mode=mode)
  probe = rj.make_runner(model_fn, head, rj.rais_sgd(0.01), rais("sync"),
                         block_size=k)
  steps = probe.pt_period  # one (PT) period of the fast path

  sgd = optax.sgd(0.01, momentum=0.9)

  step_on = plain_sgd_step(model_fn, head, sgd, m, n)  # data as a keyword
  plain_step = functools.partial(step_on, data=data)

  # The baseline gets each call's step keys as an argument, as a training loop
  # does (its keys change; the runners derive theirs from the key they are
  # given). With the keys closed over, as compile-time constants, XLA:CPU ran
  # the same scan ~12 % faster at 40-256-256, though the compiled programs
  # differ by only a handful of ops (cause not identified): timed as an extra
  # row. Every variant carries its (donated) state forward from call to call.
  call_keys = jax.random.split(jax.random.key(0), steps)
  scan = lambda step: jax.jit(
      lambda c, ks: jax.lax.scan(step, c, ks)[0], donate_argnums=0)
  plain = scan(plain_step)
  # The runners return each step's minibatch loss (as training loops that log
  # it do): a part of the forward pass that the gradient alone does not need.
  plain_loss = scan(functools.partial(plain_step, report_loss=True))
  # The runners also take the data as an argument.
  plain_arg = jax.jit(lambda c, ks, d: jax.lax.scan(
      functools.partial(step_on, data=d), c, ks)[0], donate_argnums=0)
  plain_const = jax.jit(lambda c: jax.lax.scan(plain_step, c, call_keys)[0],
                        donate_argnums=0)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  fresh = lambda: copy((params, sgd.init(params)))
  variants = {
      "optax sgd (plain scan)": carried(lambda c: plain(c, call_keys), fresh()),
      "optax sgd (plain scan, data as argument)": carried(
          lambda c: plain_arg(c, call_keys, data), fresh()),
      "optax sgd (plain scan, reporting its loss)": carried(
          lambda c: plain_loss(c, call_keys), fresh()),
      "optax sgd (plain scan, keys closed over as constants)":
          carried(plain_const, fresh()),
  }

  fast = {
      "fast: U-SGD": (rj.uniform_sampler(n, batch_size=m), None),
      "fast: RAIS, exact (ghost) norms, async (PT)": (rais("async"), "exact"),
      "fast: RAIS, exact (ghost) norms, sync (PT)": (rais("sync"), "exact"),
      "fast: RAIS, proxy norms, async (PT)": (rais("async"), "proxy"),
  }
  for name, (sampler, norms) in fast.items():
    runner = rj.make_runner(model_fn, head, rj.rais_sgd(0.01, momentum=0.9),
                            sampler, norms=norms, block_size=k)
    state = runner.init(params)
    if sampler.pt is not None:
      # Start fitted (two periods in), so every timed step samples from the trees.
      state, _ = runner.run(state, jax.random.key(1), data, 2 * steps)
      assert bool(state.sampler.fitted)
    variants[name] = carried(
        lambda s, r=runner: r.run(s, jax.random.key(2), data, steps)[0], state)

  if not args.no_per_step:
    per_step = {
        "per step: U-SGD (make_train_step)": (rj.uniform_sampler(n, batch_size=m), None),
        "per step: RAIS, exact norms, async (PT)": (rais("async"), "exact"),
    }
    for name, (sampler, norms) in per_step.items():
      opt = rj.rais_sgd(0.01, momentum=0.9)
      step = rj.make_train_step(model_fn, head, opt, sampler, norms=norms)
      run = jax.jit(lambda s, d, ks, step=step: jax.lax.scan(
          lambda c, kk: step(c, kk, d), s, ks)[0], donate_argnums=0)
      state = rj.init_train_state(copy(params), opt, sampler)
      if sampler.pt is not None:
        state = run(run(state, data, call_keys), data, call_keys)
      variants[name] = carried(lambda s, run=run: run(s, data, call_keys), state)

  medians = interleaved_medians(variants, repeats=args.repeats)
  base = medians["optax sgd (plain scan)"]
  rows = [{"variant": name, "ms/step": t / steps * 1e3, "ratio vs optax sgd": t / base}
          for name, t in medians.items()]
  md = write(args.name or f"step_overhead_{size}_m{m}", rows,
             ["variant", "ms/step", "ratio vs optax sgd"],
             f"Step time, MLP {size}, m={m}, n={n}, K={k}, {steps} steps per run "
             f"(one (PT) period), median of {args.repeats}")
  print(md)


if __name__ == "__main__":
  main()
