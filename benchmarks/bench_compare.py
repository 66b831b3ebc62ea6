"""Convergence benchmarks on real data: how much sooner RAIS-SGD, the O-SGD
oracle and the baselines (naive and loss importance sampling,
Selective-Backprop, InfoBatch) reach U-SGD's final training loss.

    python benchmarks/bench_compare.py [--suites mnist1d-mlp fashion-mlp fashion-cnn]

For each suite, U-SGD's base learning rate is first tuned by a small sweep (one
seed, the lowest final training loss over the whole training set wins); all
methods then run with that base rate and schedule (RAIS indexes the schedule by
τ) for several seeds via :func:`rais_jax.experiments.compare.run_compare`. Suites with
``variants`` run those methods again with other settings (RAIS, naive and loss
IS at O-SGD's floor ε = 0.3: at RAIS's ε = 1e-3 the point estimates diverge),
beside a U-SGD of their own in the same process. Each suite writes
``results/compare/SUITE/`` (results.json and plots) and the table
``results/compare.md``. Fashion-MNIST needs its IDX files (``apt-get install
dataset-fashion-mnist`` or ``RAIS_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from rais_jax.experiments import compare

from common import RESULTS, environment  # pylint: disable=g-bad-import-order

# naive and loss IS at a defensive floor (their stable version), and RAIS at
# the same floor for an equal comparison.
STABLE_IS = {"ε = 0.3": dict(methods=("usgd", "rais", "naive", "loss-is"), floor=0.3)}

SUITES = {
    "mnist1d-mlp": dict(
        config=compare.CompareConfig(dataset="mnist1d", model="mlp", epochs=30,
                                     batch_size=64, seeds=(0, 1, 2, 3, 4),
                                     methods=compare.METHODS),
        lrs=(0.02, 0.05, 0.1, 0.2), variants=STABLE_IS),
    "fashion-mlp": dict(
        config=compare.CompareConfig(dataset="fashion-mnist", model="mlp",
                                     epochs=15, batch_size=128, seeds=(0, 1, 2),
                                     oracle_period=50, methods=compare.METHODS),
        lrs=(0.02, 0.05, 0.1, 0.2), variants=STABLE_IS),
    # The CNN costs ~15 s per epoch on 2 CPU cores: fewer epochs, a shorter
    # sweep, and no O-SGD (its oracle needs n exact norms per refresh).
    "fashion-cnn": dict(
        config=compare.CompareConfig(dataset="fashion-mnist", model="cnn",
                                     epochs=8, batch_size=128, seeds=(0, 1, 2),
                                     methods=("usgd", "rais")),
        lrs=(0.05, 0.1, 0.2), sweep_epochs=3),
}


def sweep(config: compare.CompareConfig, lrs, epochs: int) -> tuple[float, dict]:
  losses = {}
  for lr in lrs:
    cfg = dataclasses.replace(config, lr=lr, methods=("usgd",),
                              seeds=config.seeds[:1], epochs=epochs)
    run = compare.run_compare(cfg)["runs"]["usgd"][str(cfg.seeds[0])]
    losses[lr] = run["curve"][-1]["train_loss"]
  return min(losses, key=losses.get), losses


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--suites", nargs="+", default=list(SUITES), choices=list(SUITES))
  args = p.parse_args(argv)
  out_root = RESULTS / "compare"
  tables = {}
  for name in args.suites:
    suite = SUITES[name]
    base = suite["config"]
    lr, swept = sweep(base, suite["lrs"], suite.get("sweep_epochs", base.epochs))
    print(f"{name}: U-SGD final training loss by lr {swept} -> lr {lr}", flush=True)
    config = dataclasses.replace(base, lr=lr)
    results = compare.run_compare(config, out_root / name)
    print(compare.format_summary(results["summary"]), flush=True)
    tables[name] = {"lr": lr, "sweep": swept, "summary": results["summary"],
                    "config": dataclasses.asdict(config), "variants": {}}
    for label, changes in suite.get("variants", {}).items():
      variant = dataclasses.replace(config, **changes)
      out = out_root / "-".join([name] + [f"{k}{v}" for k, v in changes.items()
                                          if k != "methods"])
      summary = compare.run_compare(variant, out)["summary"]
      print(f"{name}, {label}:\n{compare.format_summary(summary)}", flush=True)
      tables[name]["variants"][label] = {"summary": summary,
                                         "config": dataclasses.asdict(variant)}
  previous = out_root / "summary.json"
  merged = json.loads(previous.read_text()) if previous.exists() else {}
  merged.update(tables)
  merged["environment"] = environment()
  previous.write_text(json.dumps(merged, indent=1))
  lines = ["| suite | method | lr | reached | epochs to target | wall-clock to target (s) "
           "| speed-up (epochs) | speed-up (wall-clock) | ms per step "
           "| final test accuracy |",
           "|" + "---|" * 10]
  fmt = compare.format_stats
  rankings = []
  for name, entry in merged.items():
    if name == "environment":
      continue
    cfg = entry["config"]
    suite = f"{name} ({cfg['epochs']} ep., m={cfg['batch_size']}, {len(cfg['seeds'])} seeds)"
    rows = [(method, s) for method, s in entry["summary"]["methods"].items()]
    for label, variant in entry.get("variants", {}).items():
      rows += [(f"{method} ({label})", s) for method, s in
               variant["summary"]["methods"].items() if method != "usgd"]
    for method, s in rows:
      lines.append(
          f"| {suite} | {method} | {entry['lr']} | {s['epoch']['reached']} | "
          f"{fmt(s['epoch'], '.0f')} | {fmt(s['wall_clock_s'], '.2f')} | "
          f"{fmt(s['speedup_epoch'], '.2f')} | {fmt(s['speedup_wall_clock_s'], '.2f')} | "
          f"{fmt(s.get('ms_per_step', {}), '.3f')} | {fmt(s['final_test_accuracy'], '.3f')} |")
    for key, order in entry["summary"].get("ranking", {}).items():
      rankings.append(f"- {name}, by {key.replace('_', ' ')}: {' > '.join(order)}")
  md = ("### Time to U-SGD's final training loss (median [min, max] over seeds)\n\n"
        + "\n".join(lines) + "\n\nRankings (main runs; more seeds reaching the "
        "target first, then the median):\n\n" + "\n".join(rankings) + "\n")
  (RESULTS / "compare.md").write_text(md)
  print(md)


if __name__ == "__main__":
  main()
