"""Soak test: a long RAIS sampler run with injected faults.

    python benchmarks/bench_soak.py [--steps 100000 --n 1000000]
    python benchmarks/bench_soak.py --train [--steps 100000 --n 100000]

Runs sample + update for --steps steps at n examples (m = 128, default
features with 10 classes, asynchronous (PT) every ⌈|D|/m⌉ steps) on synthetic
per-example norms (log-normal per class and example, ±20 % noise per
measurement), in jitted ``lax.scan`` chunks of 1000 steps. Faults injected:
a fraction --nan-rate of the measured norms is NaN, +inf or negative, and the
(PT) solver returns NaN for about 1 solve in 6 and raises for about 1 in 6
(chosen by the data). Reports steps/s, the diagnostics counts
against the injected counts, and whether every float in the final state is
finite and every p_i > 0.

``--train`` soaks the whole training step instead (``make_train_step`` with an
MLP 32-64-10, proxy norms, SGD + momentum, the same failing solver) on
synthetic Gaussian classes in which a fraction --nan-rate of the *examples*
has NaN inputs: every step that draws one must be skipped and counted, and the
model must still learn the clean examples.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx

import rais_jax as rj
from rais_jax.pt import solver as pt_solver
from rais_jax.experiments.models import MLP, functional

from common import write  # pylint: disable=g-bad-import-order


RAISED = [0]


def _raise(flag):
  if flag:
    RAISED[0] += 1
    raise RuntimeError("injected (PT) solver fault")
  return np.float32(0.0)


def _failing_solver(solve):
  """About 1 solve in 6 returns NaN and 1 in 6 raises (chosen by the data)."""
  def solve_pt(features, norms, probs, feature_sum, *, init, max_iters):
    c, d, info = solve(features, norms, probs, feature_sum, init=init,
                       max_iters=max_iters)
    # The low bits of the snapshot's sum: a cheap, deterministic hash.
    kind = jax.lax.bitcast_convert_type(jnp.sum(norms), jnp.int32) % 6
    # The callback raises inside the jitted solve, on the background thread.
    zero = jax.pure_callback(_raise, jax.ShapeDtypeStruct((), jnp.float32),
                             kind == 1)
    return jnp.where(kind == 0, jnp.nan, c + zero), d, info
  return solve_pt


def _finite(state) -> bool:
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in floats)


def soak_train(args) -> None:
  n, m, chunk, classes = args.n, args.batch_size, 1000, 10
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, n).astype(np.int32)
  x = rng.normal(0, 1, (classes, 32))[labels] + rng.normal(0, 2, (n, 32))
  poisoned = rng.random(n) < args.nan_rate
  x[poisoned] = np.nan
  data = {"x": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)}
  clean = jax.tree.map(lambda a: a[~poisoned], data)
  model_fn, params = functional(MLP(32, [64], classes, rngs=nnx.Rngs(0)))
  head = rj.softmax_cross_entropy_head()
  sampler = rj.rais_sampler(rj.default_features(labels, classes), batch_size=m)
  opt = rj.rais_sgd(0.05, momentum=0.9)
  step = rj.make_train_step(model_fn, head, opt, sampler, norms="proxy")
  run = jax.jit(lambda s, k: jax.lax.scan(lambda c, kk: step(c, kk, data), s, k),
                donate_argnums=0)
  evaluate = jax.jit(lambda p: rj.evaluate(model_fn, head, p, clean)["loss"])
  fresh = lambda: rj.init_train_state(jax.tree.map(jnp.copy, params), opt, sampler)
  keys = jax.random.split(jax.random.key(1), args.steps).reshape(-1, chunk)
  jax.block_until_ready(run(fresh(), keys[0]))  # compile
  state = fresh()
  not_applied, r_max = 0, -np.inf
  start = time.perf_counter()
  for chunk_keys in keys:
    state, metrics = run(state, chunk_keys)
    not_applied += int((~metrics.applied).sum())
    r_max = max(r_max, float(metrics.gain_ratio.max()))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  diag = state.sampler.diagnostics
  row = {"n": n, "poisoned examples": int(poisoned.sum()), "steps": args.steps,
         "seconds": seconds, "steps/s": args.steps / seconds,
         "skipped steps": int(state.skipped_steps),
         "steps not applied (metrics)": not_applied,
         "nonfinite_norms counted": int(diag.nonfinite_norms),
         "pt_solves": int(diag.pt_solves), "pt_failures": int(diag.pt_failures),
         "of which raised": RAISED[0], "max r": r_max,
         "clean loss before": float(evaluate(params)),
         "clean loss after": float(evaluate(state.params)),
         "state finite": _finite(state)}
  print(row)
  print(write("soak_train", [row], list(row),
              f"Soak of the train step: {args.steps} steps at n = {n}, m = {m}, "
              "with NaN examples and failing (PT) solves"))


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--train", action="store_true",
                 help="soak the whole train step (default: the sampler alone)")
  p.add_argument("--steps", type=int, default=None,
                 help="default 100000")
  p.add_argument("--n", type=int, default=None,
                 help="default 1000000 (sampler) or 100000 (--train)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--nan-rate", type=float, default=None,
                 help="bad norms (default 0.01) or NaN examples (--train, 0.001)")
  args = p.parse_args(argv)
  defaults = (100_000, 100_000, 0.001) if args.train else (100_000, 1_000_000, 0.01)
  for name, value in zip(("steps", "n", "nan_rate"), defaults):
    if getattr(args, name) is None:
      setattr(args, name, value)
  pt_solver.solve_pt = _failing_solver(pt_solver.solve_pt)
  if args.train:
    soak_train(args)
  else:
    soak_sampler(args)


def soak_sampler(args) -> None:
  n, m, chunk = args.n, args.batch_size, 1000
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, n).astype(np.int32)
  true = jnp.asarray(rng.uniform(0.5, 3, 10)[labels] * rng.lognormal(0, 1, n),
                     jnp.float32)
  sampler = rj.rais_sampler(rj.default_features(labels, 10), batch_size=m)

  def body(carry, key):
    # The per-step sampler work of make_train_step: draw, fold in, the
    # gain-ratio moments, the (PT) hand-off.
    state, moments, step = carry
    k_sample, k_noise, k_fault, k_kind = jax.random.split(key, 4)
    s = sampler.sample(state, k_sample)
    u = true[s.indices] * jax.random.uniform(k_noise, (m,), minval=0.8, maxval=1.2)
    fault = jax.random.uniform(k_fault, (m,)) < args.nan_rate
    bad = jnp.array([jnp.nan, jnp.inf, -1.0])[jax.random.randint(k_kind, (m,), 0, 3)]
    u = jnp.where(fault, bad, u)
    state = sampler.fold_in(state, s, u)
    moments = rj.gain_ratio.update(moments, u, s.probs, n, jnp.float32(1.0),
                                   alpha=sampler.ema_rate)
    state = rj.pt.periodic.advance(sampler.pt, state, step + 1)
    r = rj.gain_ratio.estimate(moments, m, r_max=sampler.r_max)
    return (state, moments, step + 1), (fault.sum(), r, s.probs.min())

  run = jax.jit(lambda s, k: jax.lax.scan(body, s, k), donate_argnums=0)
  start_carry = lambda: (sampler.init(), rj.gain_ratio.init(), jnp.zeros((), jnp.int32))
  carry = start_carry()
  keys = jax.random.split(jax.random.key(1), args.steps).reshape(-1, chunk)
  jax.block_until_ready(run(start_carry(), keys[0]))  # compile
  injected, r_min, r_max, p_min = 0, np.inf, -np.inf, np.inf
  start = time.perf_counter()
  for chunk_keys in keys:
    carry, (faults, r, pmin) = run(carry, chunk_keys)
    injected += int(faults.sum())
    r_min, r_max = min(r_min, float(r.min())), max(r_max, float(r.max()))
    p_min = min(p_min, float(pmin.min()))
  jax.block_until_ready(carry)
  state = carry[0]
  seconds = time.perf_counter() - start
  finite = _finite(state)
  probs = sampler.probabilities(state)
  diag = state.diagnostics
  row = {"n": n, "steps": args.steps, "seconds": seconds,
         "steps/s": args.steps / seconds,
         "injected bad norms": injected, "nonfinite_norms counted": int(diag.nonfinite_norms),
         "pt_solves": int(diag.pt_solves), "pt_failures": int(diag.pt_failures),
         "of which raised": RAISED[0],
         "r range": f"[{r_min:.3g}, {r_max:.3g}]", "min sampled p·n": p_min * n,
         "state finite": finite, "all p > 0": bool(jnp.all(probs > 0))}
  print(row)
  print(write("soak", [row], list(row),
              f"Soak: {args.steps} sampler steps at n = {n}, m = {m}, with faults"))


if __name__ == "__main__":
  main()
