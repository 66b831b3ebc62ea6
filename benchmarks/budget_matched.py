"""Final quality of RAIS against U-SGD given RAIS's budget, from results files.

    python benchmarks/budget_matched.py --name NAME --full DIR --short DIR [DIR ...]

``--full``: a ``rais-jax compare`` run of U-SGD and RAIS for the full budget;
``--short``: U-SGD-only runs whose ``--epochs`` is RAIS's epochs run (rounded
up), its schedule fully decayed over them, one per learning rate. Writes
results/NAME.json and .md: per run, the epochs run and the final training
loss and test accuracy, median [min, max] over seeds. (A hand-made,
two-point version of the budget-matched baseline, kept for the files it made
before ``rais-jax compare --budgets --lrs`` and ``bench_frontier.py``.)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

from common import write  # pylint: disable=g-bad-import-order


def _stat(values: list[float], spec: str) -> str:
  return (f"{statistics.median(values):{spec}} "
          f"[{min(values):{spec}}, {max(values):{spec}}]")


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--name", required=True)
  p.add_argument("--full", required=True)
  p.add_argument("--short", nargs="+", required=True)
  args = p.parse_args(argv)
  rows = []
  for directory in [args.full, *args.short]:
    results = json.loads((pathlib.Path(directory) / "results.json").read_text())
    config = results["config"]
    for method, runs in results["runs"].items():
      last = [run["curve"][-1] for run in runs.values()]
      rows.append({
          "run": f"{method}, {config['epochs']} epochs budget, lr {config['lr']}",
          "file": str(pathlib.Path(directory) / "results.json"),
          "epochs run": _stat([p["epoch"] for p in last], ".2f"),
          "final train loss": _stat([p["train_loss"] for p in last], ".4f"),
          "final test accuracy": _stat([p["test_accuracy"] for p in last], ".4f")})
  print(write(args.name, rows, ["run", "epochs run", "final train loss",
                                "final test accuracy", "file"],
              "RAIS against U-SGD given RAIS's budget (schedule fully decayed over "
              "it), median [min, max] over seeds"))


if __name__ == "__main__":
  main()
