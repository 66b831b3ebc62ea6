"""Budget-matched evidence: RAIS against U-SGD's quality-versus-time frontier.

    python benchmarks/bench_frontier.py [--suites mnist1d-mlp fashion-mlp mnist1d-large
                                                 fashion-resnet-augment]

Each suite is one ``rais-jax compare --budgets ... --lrs ...`` run
(:mod:`rais_jax.experiments.frontier`): U-SGD once per (budget, lr, seed),
its cosine schedule fully decayed over that budget; RAIS once per (lr, seed)
with the full budget (it stops when τ reaches it). Per suite it writes
``results/frontier/SUITE/`` (results.json with the frontier records, and the
plots) and ``results/frontier_SUITE.md``: U-SGD's frontier (median over
seeds per lr and budget), the methods' final quality and the train–test gap,
and the budget-matched speed-ups on training loss and test accuracy per lr,
beside the time-to-target speed-ups against full-budget U-SGD.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from rais_jax.experiments import compare, frontier, plots

from common import RESULTS  # pylint: disable=g-bad-import-order

BUDGETS = (0.4, 0.55, 0.7, 0.85, 1.0)

SUITES = {
    # lr 0.1: U-SGD's tuned rate (bench_compare's sweep); it overfits (train
    # loss ~0.003, test accuracy ~0.82).
    "mnist1d-mlp": compare.CompareConfig(
        dataset="mnist1d", model="mlp", epochs=30, batch_size=64,
        seeds=(0, 1, 2, 3, 4), methods=("usgd", "rais"), lr=0.1,
        lrs=(0.05, 0.1, 0.2), budgets=BUDGETS),
    "fashion-mlp": compare.CompareConfig(
        dataset="fashion-mnist", model="mlp", epochs=15, batch_size=128,
        seeds=(0, 1, 2), methods=("usgd", "rais"), lr=0.05,
        lrs=(0.05, 0.1, 0.2), budgets=BUDGETS),
    # 160,000 training examples and 4 epochs: the test accuracy follows the
    # optimisation (a small train–test gap).
    "mnist1d-large": compare.CompareConfig(
        dataset="mnist1d", model="mlp", epochs=4, batch_size=64,
        num_samples=200_000, seeds=(0, 1, 2), methods=("usgd", "rais"), lr=0.05,
        lrs=(0.05, 0.1, 0.2), budgets=BUDGETS),
    # Not run by default (about 30 minutes on 2 CPU cores): the ResNet with
    # BatchNorm and augmentation, its blocks unrolled (XLA:CPU runs
    # convolutions in loops slowly), a smaller grid; RAIS with its default
    # norms (proxy, for this coupled loss) and with exact norms (the shares).
    "fashion-resnet-augment": compare.CompareConfig(
        dataset="fashion-mnist", model="resnet", augment=True, unroll=True,
        block_size=12, epochs=10, batch_size=128, seeds=(0, 1, 2),
        methods=("usgd", "rais", "rais-exact"), lr=0.05, lrs=(0.05, 0.1),
        budgets=(0.5, 0.7)),
}
DEFAULT_SUITES = ("mnist1d-mlp", "fashion-mlp", "mnist1d-large")


def command(cfg: dict) -> str:
  """The ``rais-jax compare`` command line of a results file's config."""
  defaults = dataclasses.asdict(compare.CompareConfig())
  flags = []
  for name, value in cfg.items():
    if isinstance(value, (list, tuple)):  # tuples in memory, lists once read from JSON
      value = list(value)
    if value == defaults[name] or (isinstance(value, list) and tuple(value) == defaults[name]):
      continue
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
      flags.append(flag)
    elif isinstance(value, list):
      flags.append(f"{flag} {(' ' if name == 'hidden' else ',').join(map(str, value))}")
    else:
      flags.append(f"{flag} {value}")
  return " ".join(["rais-jax compare", *flags])


def _median(values):
  return statistics.median(values) if values else float("nan")


def table(name: str, results: dict) -> str:
  cfg, summary = results["config"], results["summary"]
  records = results["frontier"]
  fmt, speed = compare.format_stats, frontier.format_speedups
  lines = [f"### {name}: {cfg['dataset']} {cfg['model']}, {cfg['epochs']} epochs, "
           f"m = {cfg['batch_size']}, n = {results['dataset']['n_train']}, "
           f"{len(cfg['seeds'])} seeds, cosine, momentum 0.9",
           "",
           f"Command: `{command(cfg)}`",
           "",
           "U-SGD's frontier (median over seeds; schedule fully decayed over the budget):",
           "",
           "| lr | budget (epochs) | wall-clock (s) | final train loss | final test accuracy |",
           "|---|---|---|---|---|"]
  usgd = [r for r in records if r["method"] == "usgd"]
  for lr in sorted({r["lr"] for r in usgd}):
    for budget in sorted({r["budget_epochs"] for r in usgd}):
      rs = [r for r in usgd if r["lr"] == lr and r["budget_epochs"] == budget]
      lines.append(f"| {lr:g} | {budget:.2f} | "
                   f"{_median([r['wall_clock_s'] for r in rs]):.2f} | "
                   f"{_median([r['final_train_loss'] for r in rs]):.4f} | "
                   f"{_median([r['final_test_accuracy'] for r in rs]):.4f} |")
  lines += ["", "Full-budget runs at each lr (median [min, max] over seeds; "
            "budget-matched speed-ups: `>x` U-SGD never reaches it, `<x` its "
            "smallest budget does better):", "",
            "| method | lr | epochs run | final train loss | final test accuracy "
            "| train–test accuracy gap | budget-matched speed-up, train loss "
            "| budget-matched speed-up, test accuracy | the same in epochs: train loss "
            "| in epochs: test accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  by_lr = summary["frontier"]["budget_matched_speedup_by_lr"]
  for method in cfg["methods"]:
    for lr in sorted({r["lr"] for r in records}):
      rs = [r for r in records if r["method"] == method and r["lr"] == lr
            and r["budget_epochs"] == frontier.max_budget(records, method)]
      stats = lambda key: compare._stats([r[key] for r in rs], reached=False)  # pylint: disable=protected-access
      gap = compare._stats([r["final_train_accuracy"] - r["final_test_accuracy"]  # pylint: disable=protected-access
                            for r in rs], reached=False)
      e = by_lr[str(lr)].get(method, {})
      lines.append(f"| {method} | {lr:g} | {fmt(stats('epochs_run'), '.2f')} | "
                   f"{fmt(stats('final_train_loss'), '.4f')} | "
                   f"{fmt(stats('final_test_accuracy'), '.4f')} | {fmt(gap, '.3f')} | "
                   f"{speed(e.get('final_train_loss'))} | "
                   f"{speed(e.get('final_test_accuracy'))} | "
                   f"{speed(e.get('final_train_loss_by_epochs'))} | "
                   f"{speed(e.get('final_test_accuracy_by_epochs'))} |")
  lines += ["", f"At lr {cfg['lr']}, against U-SGD run for the full budget "
            "(time to U-SGD's final training loss):", "",
            "| method | reached | speed-up (epochs) | speed-up (wall-clock) | ms per step |",
            "|---|---|---|---|---|"]
  for method, e in summary["methods"].items():
    lines.append(f"| {method} | {e['epoch']['reached']} | "
                 f"{fmt(e['speedup_epoch'], '.2f')} | "
                 f"{fmt(e['speedup_wall_clock_s'], '.2f')} | "
                 f"{fmt(e.get('ms_per_step', {}), '.3f')} |")
  env = results["environment"]
  lines += ["", f"jax {env['jax']}, backend {env['backend']}, git {env['git_commit']}, "
            f"file `benchmarks/results/frontier/{name}/results.json`."]
  return "\n".join(lines) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--suites", nargs="+", default=list(DEFAULT_SUITES), choices=list(SUITES))
  p.add_argument("--seeds", type=int, default=None,
                 help="only the first this many seeds (a quick look)")
  p.add_argument("--tables-only", action="store_true",
                 help="rewrite the summaries, tables and plots from the results "
                      "files' runs and records")
  args = p.parse_args(argv)
  for name in args.suites:
    out = RESULTS / "frontier" / name
    if args.tables_only:  # the summary recomputed from the runs and records
      results = json.loads((out / "results.json").read_text())
      results["summary"] = compare.summarise(results["runs"], None, results["frontier"],
                                             results["config"]["lr"])
      (out / "results.json").write_text(json.dumps(results, indent=1))
      plots.plot_compare(results, out)
    else:
      config = SUITES[name]
      if args.seeds:
        config = dataclasses.replace(config, seeds=config.seeds[:args.seeds])
      results = compare.run_compare(config, out, quiet=True)
    print(compare.format_summary(results["summary"]), flush=True)
    md = table(name, results)
    (RESULTS / f"frontier_{name}.md").write_text(md)
    print(md, flush=True)


if __name__ == "__main__":
  main()
