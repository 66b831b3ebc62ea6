"""Budget-matched evidence: U-SGD's quality-versus-time frontier, and how much
sooner a method reaches its final quality than U-SGD can.

A speed-up over U-SGD run for the full budget says little: U-SGD with its
learning-rate schedule fully decayed over a *shorter* budget, and its learning
rate re-tuned, often ends as well as the longer run (Kaddour et al., "No Train
No Gain", NeurIPS 2023). So U-SGD runs once per (budget, learning rate, seed),
each with its schedule decayed to its end at that budget; per seed, the
frontier holds at each budget the best final quality over the learning rates
(and that run's wall-clock), sorted by wall-clock and made monotone (with more
time a user can always run a shorter budget). A method's *budget-matched
speed-up* is the wall-clock that frontier needs to reach the method's final
quality, interpolated linearly in quality against log wall-clock between
neighbouring points, divided by the method's own wall-clock (the same in
epochs gives the sampling's share, free of the per-step costs):

* ``"="``: the frontier crosses the method's quality (or meets it exactly);
* ``">"``: U-SGD never reaches it, even at its largest budget: the speed-up is
  more than (that budget's wall-clock) / (the method's);
* ``"<"``: U-SGD's smallest budget already does better: the speed-up is less
  than (that budget's wall-clock) / (the method's);
* ``"diverged"``: the method's final quality is not finite (no value).

Records are plain JSON dicts, one per run (:func:`record`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any, NamedTuple, Optional, Sequence

# The quality measures, and whether lower is better.
QUALITIES = {"final_train_loss": True, "final_test_accuracy": False}


def record(method: str, seed: int, lr: float, budget_epochs: float, run: dict
           ) -> dict:
  """The frontier record of one run of ``rais-jax compare`` (its final point)."""
  last = run["curve"][-1]
  return {"method": method, "seed": int(seed), "lr": float(lr),
          "budget_epochs": float(budget_epochs), "epochs_run": last["epoch"],
          "wall_clock_s": last["wall_clock_s"],
          "final_train_loss": last["train_loss"],
          "final_test_accuracy": last["test_accuracy"],
          "final_train_accuracy": last.get("train_accuracy"),
          "steps": run.get("steps"), "final_lr": run.get("final_lr")}


class Speedup(NamedTuple):
  """A budget-matched speed-up: ``value`` (None when diverged) and its
  ``relation`` to the truth: ``"="``, ``">"``, ``"<"`` or ``"diverged"``."""
  value: Optional[float]
  relation: str

  def __str__(self) -> str:
    if self.value is None:
      return self.relation
    return f"{'' if self.relation == '=' else self.relation}{self.value:.2f}"


def usgd_frontier(records: Sequence[dict], seed: int, quality: str,
                  cost: str = "wall_clock_s") -> list[tuple[float, float]]:
  """U-SGD's frontier for one seed: ``[(cost, quality)]``, one point per
  budget (the best learning rate's run; non-finite runs left out), sorted by
  ``cost`` (``wall_clock_s`` or ``epochs_run``) and made monotone (the
  running best)."""
  lower = QUALITIES[quality]
  best: dict[float, dict] = {}
  for r in records:
    if r["method"] != "usgd" or r["seed"] != seed or not math.isfinite(r[quality]):
      continue
    held = best.get(r["budget_epochs"])
    if held is None or (r[quality] < held[quality] if lower
                        else r[quality] > held[quality]):
      best[r["budget_epochs"]] = r
  points, running = [], None
  for r in sorted(best.values(), key=lambda r: r[cost]):
    q = r[quality]
    if running is not None and not (q < running if lower else q > running):
      q = running
    running = q
    points.append((r[cost], q))
  return points


def speedup(frontier: Sequence[tuple[float, float]], quality: float,
            wall_clock_s: float, *, lower_is_better: bool) -> Speedup:
  """The budget-matched speed-up of a run that ended at ``quality`` after
  ``wall_clock_s`` against a monotone ``frontier`` (:func:`usgd_frontier`)."""
  if not math.isfinite(quality) or not frontier or wall_clock_s <= 0:
    return Speedup(None, "diverged")
  reaches = (lambda q: q <= quality) if lower_is_better else (lambda q: q >= quality)
  j = next((i for i, (_, q) in enumerate(frontier) if reaches(q)), None)
  if j is None:
    return Speedup(frontier[-1][0] / wall_clock_s, ">")
  t_j, q_j = frontier[j]
  if q_j == quality:
    return Speedup(t_j / wall_clock_s, "=")
  if j == 0:
    return Speedup(t_j / wall_clock_s, "<")
  t_i, q_i = frontier[j - 1]
  frac = (quality - q_i) / (q_j - q_i)
  t = math.exp(math.log(t_i) + frac * (math.log(t_j) - math.log(t_i)))
  return Speedup(t / wall_clock_s, "=")


def speedups(records: Sequence[dict], method: str, lr: float, quality: str,
             cost: str = "wall_clock_s") -> dict[int, Speedup]:
  """Per seed, the budget-matched speed-up of ``method``'s full-budget run at
  ``lr`` (U-SGD's own included) on ``quality``, in ``cost`` (wall-clock, or
  ``epochs_run``: the sampling's share of it, free of per-step costs)."""
  out, full = {}, max_budget(records, method)
  for r in records:
    if r["method"] == method and r["lr"] == lr and r["budget_epochs"] == full:
      out[r["seed"]] = speedup(usgd_frontier(records, r["seed"], quality, cost),
                               r[quality], r[cost],
                               lower_is_better=QUALITIES[quality])
  return dict(sorted(out.items()))


def max_budget(records: Sequence[dict], method: str) -> float:
  """The full budget (in epochs) of ``method``'s runs."""
  return max(r["budget_epochs"] for r in records if r["method"] == method)


def summarise(records: Sequence[dict], lr: float) -> dict[str, dict]:
  """Per method and quality, the per-seed budget-matched speed-ups at ``lr``
  in wall-clock (keys ``final_train_loss``, ``final_test_accuracy``) and in
  epochs (the same keys + ``_by_epochs``): values and relations, with the
  median, min and max of the values."""
  out: dict[str, dict] = {}
  for method in dict.fromkeys(r["method"] for r in records):
    entry = {}
    for quality, cost in itertools.product(QUALITIES, ("wall_clock_s", "epochs_run")):
      by_seed = speedups(records, method, lr, quality, cost)
      if not by_seed:
        continue
      values = [s.value for s in by_seed.values() if s.value is not None]
      stats: dict[str, Any] = {
          "seeds": list(by_seed), "per_seed": [s.value for s in by_seed.values()],
          "relations": [s.relation for s in by_seed.values()],
          "text": [str(s) for s in by_seed.values()]}
      if values:
        stats.update(median=statistics.median(values), min=min(values),
                     max=max(values))
      entry[quality if cost == "wall_clock_s" else f"{quality}_by_epochs"] = stats
    if entry:
      out[method] = entry
  return out


def format_speedups(stats: Optional[dict]) -> str:
  """``median [min, max]`` of the speed-ups, with the seeds whose value is a
  bound (``> 1.8``: U-SGD never got there) named after it."""
  if not stats or stats.get("median") is None:
    return "—" if not stats else "diverged"
  text = f"{stats['median']:.2f} [{stats['min']:.2f}, {stats['max']:.2f}]"
  bounds = [t for t, rel in zip(stats["text"], stats["relations"]) if rel != "="]
  return text + (f" ({', '.join(bounds)})" if bounds else "")


def rank(summary: dict[str, dict], methods: Sequence[str]) -> list[str]:
  """``methods`` by median budget-matched speed-up on training loss, highest
  first; ties cut by the median speed-up on test accuracy, then by name;
  methods without a value (diverged on every seed) last."""
  def key(method: str):
    entry = summary.get(method, {})
    loss = entry.get("final_train_loss", {}).get("median")
    acc = entry.get("final_test_accuracy", {}).get("median")
    return (loss is None, -(loss or 0.0), -(acc or 0.0), method)
  return sorted(methods, key=key)
