"""Where a RAIS step's time goes: the fast path's block with parts left out.

    python benchmarks/bench_step_parts.py [--in-features 40 --hidden 256 256 --batch-size 64 --n 8000 --block-size 25]

A profile by subtraction, in one process: every variant is a runner whose
block program was traced with one part of the RAIS step replaced by nothing
(or, for the draw, by uniform ``randint`` indices; for the norms, by a plain
gradient), and the difference to the whole RAIS block is that part's cost.
Parts: the fold-in after the block (features, the ring buffer D, the
sum-trees), its ring-buffer push and its tree update alone, the block's tree
draw, the per-example (ghost) norms, ‖g_R‖² (the pass over the gradient
that the gain ratio needs) and the gain ratio's per-step moments. The (PT) period work is the difference
between :meth:`Runner.run` (with it) and the same number of bare blocks.
Variants run R blocks per timed call from a fitted state, round-robin; the
table gives medians per step and the difference to the RAIS block. The
library is patched only while a variant is traced (its module attributes
are restored at once); runs without a part do not train correctly and are
for timing only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp
import optax

import rais_jax as rj
from rais_jax import gain_ratio, measure, records, step as step_lib, sum_tree

from common import (carried, interleaved_medians,  # pylint: disable=g-bad-import-order
                    parse_mlp_arguments, synthetic_mlp_problem, write)


@contextlib.contextmanager
def _replaced(module, name: str, replacement) -> Iterator[None]:
  original = getattr(module, name)
  setattr(module, name, replacement)
  try:
    yield
  finally:
    setattr(module, name, original)


def _uniform_draw(n, state, key, shape):
  del state
  idx = jax.random.randint(key, shape, 0, n, jnp.int32)
  return rj.Sample(indices=idx, probs=jnp.full(shape, 1.0 / n),
                   weights=jnp.ones(shape))


def _plain_gradient(model_fn, loss_head, params, batch, weights, **_):
  """The gradient without per-example norms (all set to 1)."""
  grads, u, inner, losses = measure.measured_gradient(
      model_fn, loss_head, params, batch, weights, norms=None)
  return grads, jnp.ones_like(u), inner, losses


# What each variant leaves out: (module, attribute, replacement), or a
# (sampler field, replacement) of the RAIS sampler (a value: its functions are
# bound when it is built, so they are replaced on it, not in their module).
_LEFT_OUT = {
    "without the fold-in": ("fold_in", lambda s, *_: s),
    "without the D push": (records, "push", lambda rec, *_: rec),
    "without the tree update": (sum_tree, "update_many", lambda tree, *_: tree),
    "without the tree draw": ("draw", None),  # uniform, filled in with n
    "without the ghost norms": (step_lib, "measured_gradient", _plain_gradient),
    "without ‖g‖²": (optax.tree, "norm",
                     lambda tree, squared=False: jnp.ones((), jnp.float32)),
    "without the gain-ratio moments": (gain_ratio, "update",
                                       lambda moments, *_, **__: moments),
}


def main(argv=None):
  args = parse_mlp_arguments(argv, repeats=15)
  n, m, k = args.n, args.batch_size, args.block_size
  data, labels, model_fn, params, size = synthetic_mlp_problem(args)
  head = rj.softmax_cross_entropy_head()
  opt = lambda: rj.rais_sgd(0.01, momentum=0.9)
  rais = lambda mode: rj.rais_sampler(rj.default_features(labels, 10),
                                      batch_size=m, pt_mode=mode)
  fitting = rj.make_runner(model_fn, head, opt(), rais("sync"), block_size=k)
  period = fitting.pt_period
  fitted, _ = fitting.run(fitting.init(params), jax.random.key(1), data, 2 * period)
  assert bool(fitted.sampler.fitted)
  blocks = period // k  # one (PT) period per timed call

  def block_variant(runner, state, patch=None):
    """``blocks`` bare blocks per call, traced with ``patch`` in place."""
    steps = jax.jit(runner.programs.steps, donate_argnums=0)
    with _replaced(*patch) if patch else contextlib.nullcontext():
      state, _ = steps(state, jax.random.key(0), data)  # traced while patched

    def call(s):
      for i in range(blocks):
        s, _ = steps(s, jax.random.key(i), data)
      return s
    return carried(call, state)

  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  uniform = rj.make_runner(model_fn, head, opt(), rj.uniform_sampler(n, batch_size=m),
                           norms=None, block_size=k)
  variants = {"U-SGD block": block_variant(uniform, uniform.init(params))}
  whole = rj.make_runner(model_fn, head, opt(), rais("sync"), block_size=k)
  variants["RAIS block"] = block_variant(whole, copy(fitted))
  for label, patch in _LEFT_OUT.items():
    sampler = rais("sync")
    if len(patch) == 2:  # a field of the sampler
      field, replacement = patch
      if field == "draw":
        replacement = lambda st, key, shape: _uniform_draw(n, st, key, shape)
      sampler, patch = sampler._replace(**{field: replacement}), None
    runner = rj.make_runner(model_fn, head, opt(), sampler, block_size=k)
    variants[f"RAIS block {label}"] = block_variant(runner, copy(fitted), patch)
  for mode in ("async", "sync"):
    runner = rj.make_runner(model_fn, head, opt(), rais(mode), block_size=k)
    state, _ = runner.run(copy(fitted), jax.random.key(2), data, period)  # compile
    variants[f"RAIS run, (PT) {mode}"] = carried(
        lambda s, r=runner: r.run(s, jax.random.key(2), data, period)[0], state)

  medians = interleaved_medians(variants, repeats=args.repeats)
  steps = blocks * k
  per_step = {name: t / steps * 1e3 for name, t in medians.items()}
  base = per_step["RAIS block"]
  rows = [{"variant": name, "ms/step": t, "vs RAIS block (ms/step)": t - base}
          for name, t in per_step.items()]
  md = write(args.name or f"step_parts_{size}_m{m}", rows,
             ["variant", "ms/step", "vs RAIS block (ms/step)"],
             f"The RAIS step by parts, MLP {size}, m={m}, n={n}, K={k}, "
             f"{steps} steps per call (one (PT) period), median of {args.repeats}")
  print(md)


if __name__ == "__main__":
  main()
