"""Does block sampling cost epochs? RAIS with blocks of K steps against K = 1.

    python benchmarks/bench_block_size.py [--dataset mnist1d] [--block-sizes 1 25 125]

On the fast path the sampler draws a block's K·m indices from the
distribution at the block's start and folds the K·m measurements in after it,
so features, trees and D are up to K steps staler than with per-step updates
(K = 1). For each K, RAIS runs the same seeds, model, schedule and keys as one
U-SGD run per seed; the table gives, per K, how many epochs RAIS needs to reach
U-SGD's final training loss, its final loss and test accuracy (median [min,
max] over seeds, and per seed). Writes ``results/block_size_DATASET.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from rais_jax.experiments import compare

from common import RESULTS, environment  # pylint: disable=g-bad-import-order


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--dataset", default="mnist1d")
  p.add_argument("--model", default="mlp")
  p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 25, 125])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--norms", default="proxy")
  p.add_argument("--name", default=None, help="results file name")
  args = p.parse_args(argv)
  base = compare.CompareConfig(
      dataset=args.dataset, model=args.model, epochs=args.epochs,
      batch_size=args.batch_size, lr=args.lr, norms=args.norms,
      seeds=tuple(args.seeds))
  usgd = compare.run_compare(dataclasses.replace(base, methods=("usgd",)),
                             plots=False)["runs"]["usgd"]
  rows, per_k = [], {}
  for k in args.block_sizes:
    rais = compare.run_compare(dataclasses.replace(base, methods=("rais",), block_size=k),
                               plots=False)["runs"]["rais"]
    summary = compare.summarise({"usgd": usgd, "rais": rais})["methods"]["rais"]
    # Mid-run, where RAIS is ahead: the training loss at half the epochs.
    mid = [rais[str(s)]["curve"][args.epochs // 2]["train_loss"] for s in args.seeds]
    summary["mid_train_loss"] = compare._stats(mid, reached=False)  # pylint: disable=protected-access
    used = rais[str(args.seeds[0])]["block_size"]  # the divisor of an epoch
    per_k[used] = {"block_size": used, "summary": summary}
    rows.append(
        f"| {used} | {summary['epoch']['reached']} | "
        f"{compare.format_stats(summary['epoch'], '.0f')} | "
        f"{[e if e is None else round(e, 2) for e in summary['epoch']['per_seed']]} | "
        f"{compare.format_stats(summary['mid_train_loss'], '.4g')} | "
        f"{compare.format_stats(summary['final_train_loss'], '.4g')} | "
        f"{compare.format_stats(summary['final_test_accuracy'], '.3f')} | "
        f"{compare.format_stats(summary['speedup_wall_clock_s'], '.2f')} | "
        f"{compare.format_stats(summary['ms_per_step'], '.3f')} |")
    print(rows[-1], flush=True)
  name = args.name or (
      f"block_size_{args.dataset.replace(':', '_').replace('/', '_')}_{args.model}")
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(
      {"environment": environment(), "args": vars(args), "block_sizes": per_k},
      indent=1))
  md = (f"### RAIS epochs to U-SGD's final training loss by block size K "
        f"({args.dataset} {args.model}, {args.epochs} epochs, m={args.batch_size}, "
        f"lr {args.lr}, {args.norms} norms, seeds {args.seeds})\n\n"
        f"| K | reached | epochs to target | per seed | train loss at epoch "
        f"{args.epochs // 2} | final train loss | final test accuracy | "
        "wall-clock speed-up to target | ms per step |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
  (RESULTS / f"{name}.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
