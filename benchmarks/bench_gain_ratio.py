"""How good is the estimated gain ratio? r̂ against the true r over training.

    python benchmarks/bench_gain_ratio.py [--dataset mnist1d] [--model mlp] [--norms exact]
        [--augment] [--dropout RATE] [--unroll] [--draws D]

RAIS trains as in ``rais-jax compare`` (same model, schedule, block size,
augmentation, and it stops when the schedule's budget of epochs equivalent
is spent); every ``--every`` steps the true gain ratio at the current
parameters and sampling distribution is computed from the exact norms of
all n examples and the full gradient (:meth:`rais_jax.Runner.exact_gain_ratio`:
independent examples, a stateful model in inference mode), beside the r̂ the
next step will use and the bias-corrected moment EMAs it is made of. With
``--draws D`` also the gain ratio of the step as it trains, by Monte Carlo
over D uniform and D p-drawn minibatches in training mode with augmentation
(:meth:`rais_jax.Runner.sampled_gain_ratio`): the truth for a loss that
couples a batch's examples (BatchNorm), and the one r̂ is then compared with.
Writes ``results/gain_ratio_DATASET_MODEL_NORMS.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments import compare
from rais_jax.experiments import data as data_lib
from rais_jax.experiments.models import functional, make_model, stateful

from common import RESULTS, environment  # pylint: disable=g-bad-import-order


def corrected_moments(moments) -> dict:
  """The bias-corrected EMAs the estimator divides."""
  weight = lambda name: float(moments.grad_weight if name.startswith("grad")
                              else moments.weight) or 1.0
  return {name: float(getattr(moments, name)) / weight(name) for name in
          ("uniform_moment", "robust_moment", "grad_sq_norm", "grad_diagonal",
           "grad_halves_inner")}


def run_seed(args, seed: int, raw, classes: int) -> list[dict]:
  train = {"x": jnp.asarray(raw["x_train"]), "label": jnp.asarray(raw["y_train"])}
  n, m = len(raw["y_train"]), args.batch_size
  config = compare.CompareConfig(dataset=args.dataset, model=args.model,
                                 epochs=args.epochs, batch_size=m, lr=args.lr,
                                 norms=args.norms, augment=args.augment,
                                 dropout=args.dropout, unroll=args.unroll)
  split = stateful if config.stateful else lambda module: (*functional(module), ())
  model_fn, params, model_state = split(make_model(
      args.model, raw["x_train"].shape[1:], classes, hidden=(256, 256),
      dropout=args.dropout, rngs=nnx.Rngs(seed)))
  steps_per_epoch = n // m
  kw = {} if args.ema_rate is None else {"ema_rate": args.ema_rate}
  sampler = rj.rais_sampler(rj.default_features(raw["y_train"], classes), batch_size=m,
                            **kw)
  args.ema_rate = sampler.ema_rate
  k = compare.block_size(steps_per_epoch, min(args.block_size, sampler.pt.period // 2))
  every = k * max(1, args.every // k)
  optimizer = rj.rais_sgd(compare.schedule(config, args.epochs * steps_per_epoch),
                          momentum=0.9)
  runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(), optimizer,
                          sampler, norms=args.norms, block_size=k,
                          augment=compare.augmentation(config), unroll=args.unroll)
  truth = jax.jit(runner.exact_gain_ratio)
  sampled = jax.jit(lambda s, d, key: runner.sampled_gain_ratio(s, d, key, draws=args.draws))
  state, key, points = runner.init(params, model_state), jax.random.key(seed), []
  budget = args.epochs * steps_per_epoch
  # Until the schedule's budget is spent (then the learning rate is 0 and
  # the parameters stop moving), as in ``rais-jax compare``.
  while float(rj.equivalent_iterations(state.opt_state)) < budget:
    state, metrics = runner.run(state, key, train, every)
    exact = truth(state, train)
    if args.draws:
      mc = sampled(state, train, jax.random.fold_in(key, state.step))
      sampled_point = {"r_sampled": float(mc.ratio), "r_sampled_se": float(mc.standard_error),
                       "sampled_uniform_moment": float(mc.uniform_moment),
                       "sampled_robust_moment": float(mc.robust_moment)}
    else:
      sampled_point = {}
    points.append(sampled_point | {
        "step": int(state.step), "epoch": int(state.step) / steps_per_epoch,
        "epochs_equivalent": float(rj.epochs_equivalent(state.opt_state, m, n)),
        "r_hat": float(runner.gain_ratio(state)),
        # What the separable decomposition of exact norms gives on the same
        # moments (for a coupled loss r̂ is instead the moment ratio,
        # rais_jax.gain_ratio; with proxy norms and no halves' ⟨g_A, g_B⟩ the
        # scale-free form is that ratio too: nothing to compare).
        **({"r_hat_separable": float(rj.gain_ratio.estimate(
            state.moments, m, r_max=sampler.r_max))} if args.norms == "exact" else {}),
        "coupled": bool(runner.programs.spec.coupled),
        "r_true": float(exact.ratio),
        "r_used_mean": float(jnp.mean(metrics.gain_ratio)),
        "true_uniform_moment": float(exact.uniform_moment),
        "true_robust_moment": float(exact.robust_moment),
        "true_full_grad_sq_norm": float(exact.full_grad_sq_norm),
        "fitted": bool(state.sampler.fitted),
        **{f"ema_{k_}": v for k_, v in corrected_moments(state.moments).items()},
    })
  runner.close()
  return points


def every_of(runs: dict) -> int:
  """Steps between two truth points."""
  return next(iter(runs.values()))[0]["step"]


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", default="mnist1d")
  p.add_argument("--model", default="mlp")
  p.add_argument("--norms", default="exact", choices=("exact", "proxy"))
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--ema-rate", type=float, default=None,
                 help="α of the moment EMAs (default: the sampler's)")
  p.add_argument("--every", type=int, default=125, help="steps between truths")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--augment", action="store_true", help="random crop + flip")
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--unroll", action="store_true",
                 help="unrolled blocks (convolutions on CPU)")
  p.add_argument("--block-size", type=int, default=32,
                 help="at most this K (and half a (PT) period)")
  p.add_argument("--draws", type=int, default=0,
                 help="also the sampled r: D uniform and D p-drawn minibatches per point")
  p.add_argument("--name", default=None)
  args = p.parse_args(argv)
  raw = data_lib.load_dataset(args.dataset)
  classes = data_lib.num_classes(raw)
  runs = {}
  for seed in args.seeds:
    runs[seed] = run_seed(args, seed, raw, classes)
    for q in runs[seed][:: max(1, len(runs[seed]) // 10)]:
      print(f"seed {seed} epoch {q['epoch']:5.1f} τ-epochs {q['epochs_equivalent']:5.1f} "
            f"r̂ {q['r_hat']:.3f} r {q['r_true']:.3f} "
            + (f"sampled r {q['r_sampled']:.3f} ± {q['r_sampled_se']:.3f} " if args.draws else "")
            + f"Û/U {q['ema_uniform_moment'] / q['true_uniform_moment']:.3f} "
            f"R̂/R {q['ema_robust_moment'] / q['true_robust_moment']:.3f}", flush=True)
  name = args.name or f"gain_ratio_{args.dataset}_{args.model}_{args.norms}"
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(
      {"environment": environment(), "args": vars(args),
       "runs": {str(s): v for s, v in runs.items()}}, indent=1))
  # After warm-up: once (PT) has fitted and the EMA has seen ~3/α steps.
  # r̂ is clipped to [1, m], so it is compared with max(r, 1).
  warm = [q for pts in runs.values() for q in pts
          if q["fitted"] and q["step"] >= max(3 / args.ema_rate, 2 * every_of(runs))]
  truths = {"r_true": "exact r (independent examples, inference mode)"}
  if args.draws:
    truths["r_sampled"] = (f"sampled r (training mode, {args.draws} + {args.draws} "
                           "minibatches per point)")
  lines = [f"### Estimated vs true gain ratio ({args.dataset} {args.model}"
           f"{' + augmentation' if args.augment else ''}"
           f"{f', dropout {args.dropout}' if args.dropout else ''}, "
           f"{args.norms} norms, m={args.batch_size}, lr {args.lr}, α={args.ema_rate}, "
           f"{args.epochs} epochs, seeds {args.seeds})", ""]
  estimates = {"r_hat": "r̂"}
  if args.norms == "exact" and any(q["coupled"] for q in warm):
    estimates["r_hat_separable"] = ("the separable decomposition's r̂ on the same "
                                    "moments (not used: the loss is coupled)")
  for (truth, label), (estimate, est_label) in itertools.product(truths.items(),
                                                                estimates.items()):
    rel = [q[estimate] / max(q[truth], 1.0) - 1 for q in warm]
    lines += [f"{est_label} against the {label}, after warm-up "
              f"({len(warm)} points), e = r̂ / max(r, 1) − 1: median "
              f"{statistics.median(rel):+.3f}, median |e| {statistics.median(np.abs(rel)):.3f}, "
              f"90th percentile of |e| {np.quantile(np.abs(rel), 0.9):.3f}, min {min(rel):+.3f}, "
              f"max {max(rel):+.3f}; |e| ≤ 0.10 at {np.mean(np.abs(rel) <= 0.1):.0%} of points; "
              f"true r < 1 (sampling worse than uniform) at "
              f"{np.mean([q[truth] < 1 for q in warm]):.0%}.", ""]
  sampled_cols = args.draws > 0
  lines += ["| seed | epoch | epochs equivalent | r̂ | exact r | r̂/r − 1 |"
            + (" sampled r ± s.e. | r̂/r − 1 |" if sampled_cols else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if sampled_cols else "")]
  for seed, pts in runs.items():
    for q in pts[:: max(1, len(pts) // 6)]:
      lines.append(f"| {seed} | {q['epoch']:.1f} | {q['epochs_equivalent']:.1f} | "
                   f"{q['r_hat']:.3f} | {q['r_true']:.3f} | {q['r_hat'] / q['r_true'] - 1:+.3f} |"
                   + (f" {q['r_sampled']:.3f} ± {q['r_sampled_se']:.3f} | "
                      f"{q['r_hat'] / q['r_sampled'] - 1:+.3f} |" if sampled_cols else ""))
  md = "\n".join(lines) + "\n"
  (RESULTS / f"{name}.md").write_text(md)
  print(md)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for i, (seed, pts) in enumerate(runs.items()):
    ep = [q["epoch"] for q in pts]
    ax.plot(ep, [q["r_true"] for q in pts], color=f"C{i}", lw=1.5,
            label=f"exact r, seed {seed}")
    ax.plot(ep, [q["r_hat"] for q in pts], color=f"C{i}", lw=1, ls="--",
            label=f"r̂, seed {seed}")
    if args.draws:
      ax.errorbar(ep, [q["r_sampled"] for q in pts], [q["r_sampled_se"] for q in pts],
                  color=f"C{i}", lw=1, ls=":", label=f"sampled r, seed {seed}")
  ax.set_xlabel("epoch")
  ax.set_ylabel("gain ratio")
  ax.set_title(f"{args.dataset} {args.model}, {args.norms} norms")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
  main()
