"""The budget-matched frontier and speed-up on hand-made records."""

import math

import pytest

from rais_jax.experiments import frontier


def _rec(method, seed, lr, budget, wall, loss, acc, epochs=None):
  return {"method": method, "seed": seed, "lr": lr, "budget_epochs": budget,
          "epochs_run": budget if epochs is None else epochs,
          "wall_clock_s": wall, "final_train_loss": loss,
          "final_test_accuracy": acc}


# U-SGD, seed 0: at budget 1 lr 0.1 is best, at 2 and 4 lr 0.2; the 0.2 run
# at budget 1 diverged (NaN), and budget 8's lone run is worse than budget 4's.
USGD = [
    _rec("usgd", 0, 0.1, 1.0, 1.0, 1.0, 0.50),
    _rec("usgd", 0, 0.2, 1.0, 1.1, math.nan, math.nan),
    _rec("usgd", 0, 0.1, 2.0, 2.1, 0.6, 0.60),
    _rec("usgd", 0, 0.2, 2.0, 2.0, 0.5, 0.70),
    _rec("usgd", 0, 0.1, 4.0, 4.2, 0.3, 0.75),
    _rec("usgd", 0, 0.2, 4.0, 4.0, 0.25, 0.80),
    _rec("usgd", 0, 0.1, 8.0, 8.0, 0.4, 0.78),
]


def test_frontier_takes_the_best_lr_per_budget_and_the_running_best():
  assert frontier.usgd_frontier(USGD, 0, "final_train_loss") == [
      (1.0, 1.0), (2.0, 0.5), (4.0, 0.25), (8.0, 0.25)]
  assert frontier.usgd_frontier(USGD, 0, "final_test_accuracy") == [
      (1.0, 0.5), (2.0, 0.7), (4.0, 0.8), (8.0, 0.8)]
  assert frontier.usgd_frontier(USGD, 1, "final_train_loss") == []  # no such seed
  # A budget whose runs all diverged is left out.
  nan_only = [_rec("usgd", 0, 0.1, 1.0, 1.0, math.nan, math.nan), USGD[2]]
  assert frontier.usgd_frontier(nan_only, 0, "final_train_loss") == [(2.1, 0.6)]


@pytest.mark.parametrize("loss, wall, expected", [
    # Between budgets 2 and 4, halfway in quality: √(2·4) in log wall-clock.
    (0.375, 1.0, frontier.Speedup(math.sqrt(8.0), "=")),
    (0.375, 2.0, frontier.Speedup(math.sqrt(8.0) / 2, "=")),
    # A tie with a budget's point: exactly its wall-clock (the first such).
    (0.5, 1.0, frontier.Speedup(2.0, "=")),
    (0.25, 2.0, frontier.Speedup(2.0, "=")),
    # Better than every budget: more than the largest one's wall-clock.
    (0.2, 2.0, frontier.Speedup(4.0, ">")),
    # Worse than the smallest budget: less than its wall-clock.
    (1.5, 0.5, frontier.Speedup(2.0, "<")),
    (math.nan, 1.0, frontier.Speedup(None, "diverged")),
])
def test_speedup_on_training_loss(loss, wall, expected):
  got = frontier.speedup(frontier.usgd_frontier(USGD, 0, "final_train_loss"),
                         loss, wall, lower_is_better=True)
  assert got.relation == expected.relation
  assert got.value == pytest.approx(expected.value) if expected.value else got.value is None


def test_speedup_on_accuracy_is_higher_is_better():
  points = frontier.usgd_frontier(USGD, 0, "final_test_accuracy")
  # 0.75 lies halfway between budget 2 (0.7) and budget 4 (0.8).
  got = frontier.speedup(points, 0.75, 1.0, lower_is_better=False)
  assert got == pytest.approx(frontier.Speedup(math.sqrt(8.0), "="))
  assert frontier.speedup(points, 0.9, 1.0, lower_is_better=False).relation == ">"
  assert frontier.speedup(points, 0.4, 1.0, lower_is_better=False).relation == "<"
  assert frontier.speedup([], 0.4, 1.0, lower_is_better=False).relation == "diverged"


def test_summary_per_method_and_seed_and_the_ranking():
  records = USGD + [
      _rec("usgd", 1, 0.1, 1.0, 1.0, 1.0, 0.5), _rec("usgd", 1, 0.1, 8.0, 8.0, 0.5, 0.7),
      # RAIS (full budget 8): seed 0 halfway to budget 4, seed 1 beyond U-SGD.
      _rec("rais", 0, 0.1, 8.0, 1.0, 0.375, 0.75, epochs=2.0),
      _rec("rais", 1, 0.1, 8.0, 2.0, 0.4, 0.75),
      # Another method at a second lr only, and one that diverged everywhere.
      _rec("naive", 0, 0.2, 8.0, 1.0, 0.25, 0.8),
      _rec("loss-is", 0, 0.1, 8.0, 1.0, math.nan, math.nan),
      _rec("loss-is", 1, 0.1, 8.0, 1.0, math.nan, math.nan),
  ]
  summary = frontier.summarise(records, 0.1)
  rais = summary["rais"]["final_train_loss"]
  assert rais["seeds"] == [0, 1] and rais["relations"] == ["=", ">"]
  assert rais["per_seed"] == pytest.approx([math.sqrt(8.0), 4.0])
  assert rais["median"] == pytest.approx((math.sqrt(8.0) + 4.0) / 2)
  assert frontier.format_speedups(rais) == "3.41 [2.83, 4.00] (>4.00)"
  # In epochs (seed 0's U-SGD budgets are its epochs: 1, 2, 4, 8): 0.375
  # lies halfway between 2 and 4, and RAIS ran 2 epochs.
  by_epochs = summary["rais"]["final_train_loss_by_epochs"]
  assert by_epochs["per_seed"][0] == pytest.approx(math.sqrt(8.0) / 2)
  # U-SGD's own full-budget run (lr 0.1, budget 8) against its frontier:
  # seed 0's 0.4 lies between budgets 2 and 4.
  assert summary["usgd"]["final_train_loss"]["relations"] == ["=", "="]
  assert "naive" not in summary  # no run at lr 0.1
  assert summary["loss-is"]["final_train_loss"]["relations"] == ["diverged"] * 2
  assert frontier.format_speedups(summary["loss-is"]["final_train_loss"]) == "diverged"
  assert frontier.rank(summary, ["loss-is", "usgd", "rais", "naive"]) == [
      "rais", "usgd", "loss-is", "naive"]


def test_rank_cuts_ties_by_accuracy_then_name():
  entry = lambda loss, acc: {"final_train_loss": {"median": loss},
                             "final_test_accuracy": {"median": acc}}
  summary = {"a": entry(1.5, 1.0), "b": entry(1.5, 1.2), "c": entry(1.5, 1.2),
             "d": entry(2.0, 0.5)}
  assert frontier.rank(summary, ["a", "b", "c", "d"]) == ["d", "b", "c", "a"]
