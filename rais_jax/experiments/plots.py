"""Plots of a comparison's results (:mod:`rais_jax.experiments.compare`), as
PNG files. Figures are drawn with matplotlib's object API (``Figure``), so
importing this module leaves the global backend and pyplot state alone."""

from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

_COLOURS = {"usgd": "tab:blue", "rais": "tab:orange", "rais-proxy": "tab:olive",
            "rais-exact": "tab:cyan", "osgd": "tab:green",
            "naive": "tab:red", "loss-is": "tab:purple",
            "selective-backprop": "tab:brown", "infobatch": "tab:pink"}
_LABELS = {"usgd": "U-SGD", "rais": "RAIS-SGD", "rais-proxy": "RAIS-SGD, proxy norms",
           "rais-exact": "RAIS-SGD, exact norms", "osgd": "O-SGD (oracle)",
           "naive": "naive IS (last norms)", "loss-is": "loss IS",
           "selective-backprop": "Selective-Backprop", "infobatch": "InfoBatch"}


def _curves(ax, results: dict, x: str, y: str, *, log: bool = False) -> None:
  for method, by_seed in results["runs"].items():
    for i, run in enumerate(by_seed.values()):
      curve = run["curve"]
      ax.plot([p[x] for p in curve], [p[y] for p in curve],
              color=_COLOURS.get(method), alpha=0.8, lw=1.2,
              label=_LABELS.get(method, method) if i == 0 else None)
  if log:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()


def _targets_and_schedule_ends(ax, results: dict, x: str) -> None:
  """U-SGD's final loss per seed (the target, dashed) and a marker where a
  method's schedule budget ran out."""
  for i, target in enumerate(results["summary"].get("targets", [])):
    ax.axhline(target, color="tab:blue", ls="--", lw=0.8, alpha=0.6,
               label="target: U-SGD's final loss" if i == 0 else None)
  first = True
  for method, by_seed in results["runs"].items():
    for run in by_seed.values():
      if run.get("schedule_end_epoch") is not None:
        end = run["curve"][-1]
        ax.plot(end[x], end["train_loss"], marker="x", ms=7,
                color=_COLOURS.get(method), ls="none",
                label="schedule budget spent" if first else None)
        first = False
  ax.legend()


def _cost_per_step(results: dict, out: pathlib.Path, title: str) -> pathlib.Path:
  """Wall-clock per step of each method (median over seeds, bars; the dots
  are the seeds), beside the real epochs each ran."""
  methods = [m for m, runs in results["runs"].items()
             if all("ms_per_step" in r for r in runs.values())]
  fig = Figure(figsize=(10, 4))
  axes = fig.subplots(1, 2)
  for ax, key, label in ((axes[0], "ms_per_step", "wall-clock per step (ms)"),
                         (axes[1], None, "epochs run (real passes)")):
    for i, method in enumerate(methods):
      runs = results["runs"][method].values()
      values = [r[key] if key else r["curve"][-1]["epoch"] for r in runs]
      ax.bar(i, sorted(values)[len(values) // 2], color=_COLOURS.get(method), alpha=0.7)
      ax.plot([i] * len(values), values, "k.", ms=4)
    ax.set_xticks(range(len(methods)), [_LABELS.get(m, m) for m in methods],
                  rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=label, title=title)
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(out / "cost_per_step.png", dpi=110)
  return out / "cost_per_step.png"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _median(values: list[float]) -> float:
  values = sorted(values)
  mid = len(values) // 2
  return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _frontier(results: dict, out: pathlib.Path, x: str, title: str) -> pathlib.Path:
  """Final training loss and test accuracy against ``x`` (``wall_clock_s`` or
  ``epochs_run``): each U-SGD learning rate a line over its budgets (median
  over seeds; the seeds as dots), every other method's full-budget runs as
  points per seed (one marker per learning rate), their median as a large
  marker."""
  records = [r for r in results["frontier"] if all(
      isinstance(r[k], (int, float)) for k in (x, "final_train_loss"))]
  lrs = sorted({r["lr"] for r in records})
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  for ax, y, label, log in ((axes[0], "final_train_loss", "final training loss (full set)", True),
                            (axes[1], "final_test_accuracy", "final test accuracy", False)):
    for i, lr in enumerate(lrs):
      marker = _MARKERS[i % len(_MARKERS)]
      mine = [r for r in records if r["lr"] == lr]
      usgd = [r for r in mine if r["method"] == "usgd"]
      budgets = sorted({r["budget_epochs"] for r in usgd})
      line = [([r[x] for r in usgd if r["budget_epochs"] == b],
               [r[y] for r in usgd if r["budget_epochs"] == b]) for b in budgets]
      ax.plot([_median(xs) for xs, _ in line], [_median(ys) for _, ys in line],
              color=_COLOURS["usgd"], marker=marker, alpha=0.4 + 0.6 * (i + 1) / len(lrs),
              label=f"U-SGD, lr {lr:g}, budgets {budgets[0]:g}–{budgets[-1]:g} ep."
              if budgets else None)
      ax.plot([r[x] for r in usgd], [r[y] for r in usgd], ".", ms=3,
              color=_COLOURS["usgd"], alpha=0.4)
      for method in dict.fromkeys(r["method"] for r in mine if r["method"] != "usgd"):
        runs = [r for r in mine if r["method"] == method]
        colour = _COLOURS.get(method)
        ax.plot([r[x] for r in runs], [r[y] for r in runs], marker, ms=4,
                color=colour, alpha=0.5, ls="none")
        ax.plot(_median([r[x] for r in runs]), _median([r[y] for r in runs]),
                marker, ms=10, color=colour, mec="k", ls="none",
                label=f"{_LABELS.get(method, method)}, lr {lr:g}")
    if log:
      ax.set_yscale("log")
    xlabel = ("wall-clock training time (s)" if x == "wall_clock_s"
              else "epochs run (real passes)")
    ax.set(xlabel=xlabel, ylabel=label, title=title)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  name = "frontier_wall_clock.png" if x == "wall_clock_s" else "frontier_epochs.png"
  fig.savefig(out / name, dpi=110)
  return out / name


def plot_compare(results: dict, out: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the comparison plots to ``out``; returns their paths."""
  out = pathlib.Path(out)
  cfg = results["config"]
  title = f"{cfg['dataset']}, {cfg['model']}, m = {cfg['batch_size']}"
  specs = [
      ("loss_vs_epochs.png", "epoch", "train_loss", "epoch (real passes over the data)",
       "training loss (full set)", True),
      ("loss_vs_wall_clock.png", "wall_clock_s", "train_loss",
       "wall-clock training time (s)", "training loss (full set)", True),
      ("loss_vs_epochs_equivalent.png", "epochs_equivalent", "train_loss",
       "epochs equivalent (τ / (n/m))", "training loss (full set)", True),
      ("test_accuracy.png", "epoch", "test_accuracy", "epoch",
       "test accuracy", False),
      ("gain_ratio.png", "epoch", "gain_ratio", "epoch",
       "gain ratio r (mean over the epoch)", False),
  ]
  paths = []
  for name, x, y, xlabel, ylabel, log in specs:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    _curves(ax, results, x, y, log=log)
    if y == "train_loss" and x != "epochs_equivalent":
      _targets_and_schedule_ends(ax, results, x)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    paths.append(out / name)
  paths.append(_cost_per_step(results, out, title))
  if results.get("frontier"):
    paths += [_frontier(results, out, x, title) for x in ("wall_clock_s", "epochs_run")]
  rais = results["runs"].get("rais")
  if rais:
    run = next(iter(rais.values()))
    names = run["feature_names"]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, what in ((axes[0], "c", "c (centre of U)"),
                          (axes[1], "d", "d (widths of U)")):
      ax.bar(range(len(names)), run[key])
      ax.set_xticks(range(len(names)), names, rotation=60, ha="right",
                    fontsize=8)
      ax.set(title=f"learned {what}, seed {next(iter(rais))}")
    fig.tight_layout()
    fig.savefig(out / "learned_c_d.png", dpi=110)
    paths.append(out / "learned_c_d.png")
  return paths
