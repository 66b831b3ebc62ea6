import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from rais_jax.experiments import cli, compare

POINT_KEYS = {"epoch", "epochs_equivalent", "wall_clock_s", "train_loss", "train_accuracy",
              "test_loss",
              "test_accuracy", "gain_ratio", "pt_solves", "pt_failures",
              "nonfinite_norms", "skipped_steps"}
PLOTS = ["loss_vs_epochs.png", "loss_vs_wall_clock.png", "loss_vs_epochs_equivalent.png", "test_accuracy.png",
         "gain_ratio.png", "cost_per_step.png", "learned_c_d.png"]


def _curve(losses, seconds_per_epoch):
  return [{"epoch": e, "wall_clock_s": e * seconds_per_epoch, "train_loss": l,
           "test_accuracy": 0.5} for e, l in enumerate(losses)]


def test_time_to_target_on_hand_made_curves():
  curve = _curve([2.0, 1.0, 0.6, 0.7, 0.5], 1.5)
  assert compare.time_to_target(curve, 0.6, "epoch") == 2  # first point ≤ target
  assert compare.time_to_target(curve, 0.6, "wall_clock_s") == 3.0
  assert compare.time_to_target(curve, 0.55, "epoch") == 4
  assert compare.time_to_target(curve, 0.4, "epoch") is None
  assert compare.time_to_target(curve, 5.0, "epoch") == 0


def test_summary_speedups_median_and_spread():
  runs = {
      "usgd": {"0": {"curve": _curve([2, 1, 0.5, 0.4], 1.0)},
               "1": {"curve": _curve([2, 1, 0.6, 0.3], 1.0)}},
      # seed 0 reaches 0.4 at epoch 2 (2 s, U-SGD took 3 s); seed 1 reaches 0.3
      # at epoch 1 (2 s); wall-clock per epoch is 1 s and 2 s.
      "rais": {"0": {"curve": _curve([2, 0.9, 0.35, 0.2], 1.0)},
               "1": {"curve": _curve([2, 0.3, 0.2, 0.1], 2.0)}},
      "osgd": {"0": {"curve": _curve([2, 1.5, 1.0, 0.9], 1.0)},
               "1": {"curve": _curve([2, 0.25, 0.2, 0.1], 1.0)}},
  }
  s = compare.summarise(runs)
  assert s["seeds"] == [0, 1] and s["targets"] == [0.4, 0.3]
  rais = s["methods"]["rais"]
  assert rais["epoch"]["per_seed"] == [2, 1]
  assert rais["speedup_epoch"]["per_seed"] == [1.5, 3.0]
  assert rais["speedup_wall_clock_s"]["per_seed"] == [1.5, 1.5]
  assert rais["speedup_epoch"]["median"] == 2.25
  assert (rais["speedup_epoch"]["min"], rais["speedup_epoch"]["max"]) == (1.5, 3.0)
  osgd = s["methods"]["osgd"]
  assert osgd["epoch"]["reached"] == "1/2" and osgd["speedup_epoch"]["per_seed"] == [None, 3.0]
  assert s["methods"]["usgd"]["speedup_epoch"]["median"] == 1.0
  # Given U-SGD's 3 s: seed 0 (1 s/epoch) ends at 0.2, seed 1 (2 s/epoch) has
  # only reached epoch 1 (0.3).
  assert rais["at_usgd_wall_clock"]["train_loss"]["per_seed"] == [0.2, 0.3]
  assert rais["usgd_at_equal_epochs"]["train_loss"]["per_seed"] == [0.4, 0.3]


def test_summary_of_a_method_that_stops_early():
  """RAIS stops when its schedule's budget is spent, mid-epoch: its epochs run
  are fractional, and U-SGD is compared at the next whole epoch."""
  usgd = {"0": {"curve": _curve([2, 1, 0.5, 0.4], 1.0)}}
  curve = _curve([2, 0.6, 0.38], 1.0)
  curve[-1]["epoch"] = 1.6
  s = compare.summarise({"usgd": usgd, "rais": {"0": {"curve": curve}}})["methods"]["rais"]
  assert s["epochs_run"]["per_seed"] == [1.6]
  assert s["epoch"]["per_seed"] == [1.6] and s["speedup_epoch"]["per_seed"] == [3 / 1.6]
  assert s["usgd_at_equal_epochs"]["train_loss"]["per_seed"] == [0.5]  # epoch 2
  assert s["at_usgd_wall_clock"]["train_loss"]["per_seed"] == [0.38]
  assert "note" in compare.summarise({"rais": {"0": {"curve": curve}}})


def test_cli_end_to_end_all_methods(tmp_path):
  results = cli.run(["compare", "--epochs", "2", "--num-samples", "400", "--hidden", "16",
                     "--seeds", "0,1", "--batch-size", "32", "--oracle-period", "4",
                     "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"] == json.loads(json.dumps(results["summary"]))
  assert set(saved["runs"]) == {"usgd", "rais", "osgd"}
  for method, by_seed in saved["runs"].items():
    assert set(by_seed) == {"0", "1"}
    for seed, run in by_seed.items():
      epochs = [p["epoch"] for p in run["curve"]]
      assert run["seed"] == int(seed)
      if method == "usgd":
        assert epochs == [0, 1, 2]
      else:  # until the schedule's budget (2 epochs equivalent) is spent
        assert epochs[:2] == [0, 1] and 1 < epochs[-1] <= 2
        last = run["curve"][-1]
        # r ≥ 1, so τ reaches the budget by epoch 2 at the latest: always a stop.
        assert last["epochs_equivalent"] >= 2 - 1e-6
        assert run["schedule_end_epoch"] == epochs[-1]
        # ...checked block by block: no block starts after it.
        assert 0 <= run["steps_after_budget"] <= run["block_size"] - 1
      assert all(POINT_KEYS <= set(p) for p in run["curve"])
      assert all(np.isfinite(p["train_loss"]) for p in run["curve"])
      assert run["curve"][-1]["skipped_steps"] == 0
      walls = [p["wall_clock_s"] for p in run["curve"]]
      assert walls[0] == 0 and walls[1] > 0 and walls[-1] > walls[1]
    if method == "rais":
      assert len(run["c"]) == len(run["d"]) == len(run["feature_names"]) == 13
  assert set(saved["summary"]["methods"]) == {"usgd", "rais", "osgd"}
  env = saved["environment"]
  assert env["rais_jax"] and "git_commit" in env and saved["config"]["seeds"] == [0, 1]
  # The two seeds start from different initialisations.
  assert saved["runs"]["usgd"]["0"]["curve"][0] != saved["runs"]["usgd"]["1"]["curve"][0]
  for name in PLOTS:
    assert (tmp_path / name).stat().st_size > 0


def test_cli_end_to_end_baselines(tmp_path):
  """naive, loss-is, Selective-Backprop and InfoBatch beside U-SGD: curves,
  per-step cost, their counters, and the rankings."""
  methods = ["usgd", "naive", "loss-is", "selective-backprop", "infobatch"]
  results = cli.run(["compare", "--epochs", "4", "--num-samples", "400", "--hidden", "16",
                     "--seeds", "0", "--batch-size", "32", "--methods", ",".join(methods),
                     "--floor", "0.3", "--sb-beta", "2", "--infobatch-delta", "0.5",
                     "--out", str(tmp_path), "--no-plots"])
  runs = results["runs"]
  assert list(runs) == methods
  steps_per_epoch = 320 // 32
  for method, by_seed in runs.items():
    run = by_seed["0"]
    assert run["steps"] > 0 and run["ms_per_step"] > 0
    assert all(np.isfinite(p["train_loss"]) for p in run["curve"])
    last = run["curve"][-1]
    if method == "selective-backprop":  # (β + 1) m = 96 candidates per step
      assert last["forwarded"] == 4 * steps_per_epoch * 96
      assert 0 < last["backpropagated"] <= 4 * steps_per_epoch * 32
    if method == "infobatch":  # epochs 2 pruned; 3, 4 full (δ = 0.5)
      assert 0 < run["steps"] < 4 * steps_per_epoch and last["pruned"] > 0
      assert abs(last["epochs_equivalent"] - 4) < 1e-4
      assert len(run["curve"]) == 5 and last["epoch"] < 4
    if method in ("usgd", "loss-is", "selective-backprop"):
      assert run["steps"] == 4 * steps_per_epoch
  summary = results["summary"]
  ranking = summary["ranking"]
  assert sorted(ranking["budget_matched_speedup"]) == sorted(methods)
  assert ranking["budget_matched_speedup_unbiased"] == [
      m for m in ranking["budget_matched_speedup"] if m in ("usgd", "naive", "loss-is")]
  accuracy = [summary["methods"][m]["final_test_accuracy"]["median"]
              for m in summary["ranking"]["final_test_accuracy"]]
  assert accuracy == sorted(accuracy, reverse=True)
  assert "ranked by budget matched speedup" in compare.format_summary(summary)


def test_ranking_on_hand_made_summaries():
  """By the budget-matched speed-up on training loss; ties by the one on
  test accuracy, then the name; none (diverged) last."""
  matched = lambda loss, acc: {"final_train_loss": {"median": loss},
                               "final_test_accuracy": {"median": acc}}
  methods = {
      "rais": {"budget_matched_speedup": matched(1.6, 1.1),
               "final_test_accuracy": {"median": 0.7}},
      "usgd": {"budget_matched_speedup": matched(0.9, 1.0),
               "final_test_accuracy": {"median": 0.9}},
      "infobatch": {"budget_matched_speedup": matched(1.6, 1.3),
                    "final_test_accuracy": {"median": 0.8}},
      "naive": {"budget_matched_speedup": {},
                "final_test_accuracy": {"median": 0.1}},
  }
  assert compare.ranking(methods, {"infobatch": False}) == {
      "budget_matched_speedup": ["infobatch", "rais", "usgd", "naive"],
      "budget_matched_speedup_unbiased": ["rais", "usgd", "naive"],
      "final_test_accuracy": ["usgd", "infobatch", "rais", "naive"]}


def test_frontier_end_to_end_and_quiet(tmp_path, capsys):
  """--budgets/--lrs: U-SGD once per (budget, lr, seed) with its schedule
  decayed to its end at the budget, RAIS once per (lr, seed); the records,
  the budget-matched speed-ups in the summary; --quiet prints the summary only."""
  # n = 240, m = 24: 10 steps per epoch, K = 5; 4 epochs, budget 0.55 = 22
  # steps, rounded to whole blocks: 20.
  results = cli.run(["compare", "--epochs", "4", "--num-samples", "300", "--hidden", "8",
                     "--seeds", "0,1", "--batch-size", "24", "--block-size", "5",
                     "--methods", "usgd,rais", "--lr", "0.1", "--lr-schedule", "linear",
                     "--budgets", "0.55", "--lrs", "0.05", "--out", str(tmp_path),
                     "--quiet"])
  out = capsys.readouterr()
  assert "seed 0:" not in out.out and "ranked by budget matched speedup" in out.out
  assert "\r" not in out.err  # no progress bar
  records = results["frontier"]
  keys = {(r["method"], r["lr"], r["budget_epochs"], r["seed"]) for r in records}
  assert len(keys) == len(records) == 2 * (2 * 2 + 2)
  assert keys == {("usgd", lr, b, s) for lr in (0.1, 0.05) for b in (2.0, 4.0)
                  for s in (0, 1)} | {("rais", lr, 4.0, s) for lr in (0.1, 0.05)
                                      for s in (0, 1)}
  for r in records:
    assert r["final_lr"] == 0.0  # the schedule is spent when the run ends
    assert r["wall_clock_s"] > 0 and math.isfinite(r["final_train_loss"])
    if r["method"] == "usgd":
      assert r["steps"] == round(r["budget_epochs"] * 10)
      assert r["epochs_run"] == r["budget_epochs"]
  runs = results["runs"]
  assert list(runs) == ["usgd", "rais"]  # the main runs: lr 0.1, full budget
  for run in runs["usgd"].values():  # its last step ran at the schedule's last rate
    assert run["last_step_lr"] == pytest.approx(0.1 / 40)
  main = [r for r in records if r["lr"] == 0.1 and r["budget_epochs"] == 4.0]
  assert [r["final_train_loss"] for r in main] == [
      run["curve"][-1]["train_loss"] for m in runs for run in runs[m].values()]
  summary = results["summary"]
  assert summary["frontier"]["usgd_budgets_epochs"] == [2.0, 4.0]
  assert set(summary["frontier"]["budget_matched_speedup_by_lr"]) == {"0.05", "0.1"}
  for method in ("usgd", "rais"):
    matched = summary["methods"][method]["budget_matched_speedup"]
    for quality in ("final_train_loss", "final_test_accuracy"):
      assert matched[quality]["seeds"] == [0, 1]
      assert all(v > 0 for v in matched[quality]["per_seed"])
  assert (tmp_path / "frontier_wall_clock.png").stat().st_size > 0
  assert (tmp_path / "frontier_epochs.png").stat().st_size > 0


def test_budget_decays_the_schedule_over_whole_blocks():
  """U-SGD at budget b: the schedule's length is b·epochs, rounded to whole
  blocks of K, and at least one block."""
  config = compare.CompareConfig(epochs=3, batch_size=10, block_size=4)
  labels = np.arange(100) % 10  # 10 steps per epoch: K = 2
  make = lambda b: compare.MethodRunner("usgd", compare.METHODS["usgd"], config, None,
                                        None, labels, 10, lambda p, x: x, budget=b)
  assert [make(b).budget_steps for b in (1.0, 0.5, 0.55, 0.01)] == [30, 16, 16, 2]
  runner = make(0.5)
  assert runner.budget_epochs == 1.6
  assert runner.schedule(16) == 0.0 < runner.schedule(15)


@pytest.mark.parametrize("flags, message", [
    (["--budgets", "0,0.5"], "budgets must be a non-empty list"),
    (["--budgets", "1.5"], "budgets must be a non-empty list"),
    (["--budgets", ""], "budgets must be a non-empty list"),
    (["--lrs", ""], "lrs must be a non-empty list"),
    (["--lrs", "0.1,-1"], "lrs must be a non-empty list"),
    (["--budgets", "0.5", "--methods", "rais"], "add usgd to methods"),
])
def test_bad_frontier_flags_get_one_clear_error(flags, message):
  with pytest.raises(SystemExit, match=message):
    cli.run(["compare", "--num-samples", "100", "--no-plots", *flags])


def test_cli_npz_dataset_with_cnn(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 8, 8)).astype(np.float32)
  y = (x[:, :4].mean((1, 2)) > 0).astype(np.int64)
  np.savez(tmp_path / "d.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
  results = cli.run(["compare", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--model", "cnn",
                     "--methods", "usgd,rais", "--epochs", "1", "--seeds", "0",
                     "--batch-size", "16", "--out", str(tmp_path / "out"), "--no-plots"])
  assert results["dataset"] == {"n_train": 64, "n_test": 32, "input_shape": [8, 8],
                                "classes": 2}
  assert not (tmp_path / "out" / "loss_vs_wall_clock.png").exists()


def test_cli_resnet_with_augmentation_and_dropout(tmp_path):
  """``--model resnet --augment --dropout``: BatchNorm, dropout and crop+flip
  reach the run (tiny npz images), with RAIS (norms of a coupled loss). The
  other methods on a stateful model: test_model.py (a ResNet run costs ~15 s
  of compilation per method)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 8, 8)).astype(np.float32)
  y = (x[:, :4].mean((1, 2)) > 0).astype(np.int64)
  np.savez(tmp_path / "d.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
  methods = "rais"
  results = cli.run(["compare", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--model",
                     "resnet", "--augment", "--dropout", "0.1", "--methods", methods,
                     "--epochs", "1", "--seeds", "0", "--batch-size", "16",
                     "--oracle-period", "4", "--out", str(tmp_path / "out"), "--no-plots"])
  assert results["config"]["augment"] and results["config"]["dropout"] == 0.1
  for method, by_seed in results["runs"].items():
    curve = by_seed["0"]["curve"]
    assert all(np.isfinite(p["train_loss"]) for p in curve), method
    assert curve[-1]["skipped_steps"] == 0, method


@pytest.mark.parametrize("argv,message", [
    (["--methods", "usgd,sgd"], "methods must be"),
    (["--model", "cnn", "--dropout", "0.2"], "no dropout"),
    (["--dropout", "1"], "dropout must lie"),
    (["--augment"], "mnist1d holds 1-D"),
    (["--seeds", "a,b"], "comma-separated integers"),
    (["--dataset", "npz:/nonexistent.npz"], "does not exist"),
    (["--epochs", "0"], "epochs must be"),
    (["--floor", "0"], "floor must lie"),
    (["--infobatch-ratio", "1"], "infobatch_ratio must lie"),
])
def test_cli_errors(tmp_path, argv, message, capsys):
  with pytest.raises(SystemExit) as exc:
    cli.run(["compare", "--out", str(tmp_path), *argv])
  assert message in str(exc.value) + capsys.readouterr().err


def test_flags_reach_the_config():
  """--r-max, --lr-schedule, --data-dir (and the others) set their fields."""
  config, _ = cli.parse(["compare", "--r-max", "4", "--lr-schedule", "constant",
                         "--data-dir", "/somewhere", "--methods", "usgd,naive"])
  assert (config.r_max, config.lr_schedule, config.data_dir) == (4.0, "constant", "/somewhere")
  assert config.methods == ("usgd", "naive")
  schedule = compare.schedule(config, 100)
  assert float(schedule(0)) == float(schedule(99)) == config.lr  # constant


def test_data_dir_is_where_fashion_mnist_is_read_from(tmp_path):
  """A tiny Fashion-MNIST written to --data-dir is the one trained on (not a
  system-wide copy)."""
  import test_data  # pylint: disable=import-outside-toplevel
  test_data._fashion_dir(tmp_path, n_train=48, n_test=8)  # pylint: disable=protected-access
  results = cli.run(["compare", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                     "--methods", "usgd", "--seeds", "0", "--epochs", "1",
                     "--batch-size", "8", "--hidden", "4", "--out", str(tmp_path / "out"),
                     "--no-plots", "--quiet"])
  assert (results["dataset"]["n_train"], results["dataset"]["n_test"]) == (48, 8)


SCRIPT = os.path.join(os.path.dirname(sys.executable), "rais-jax")


@pytest.mark.parametrize("command", [[SCRIPT], [sys.executable, "-m", "rais_jax"]])
def test_entry_points(command):
  """The console script (installed beside this interpreter) and ``python -m
  rais_jax`` are the same command."""
  if not os.path.exists(command[0]) and command[0] == SCRIPT:
    pytest.skip("rais-jax is not installed in this environment (only importable)")
  out = subprocess.run([*command, "compare", "--help"], capture_output=True, text=True,
                       timeout=120, check=True).stdout
  assert "--methods" in out and "--lr-schedule" in out


def test_wall_clock_excludes_compilation_and_evaluation(monkeypatch):
  """The timed intervals (the clock of MethodRunner.run) hold no compilation
  (JAX's tracing, lowering and compile events) and no evaluation (the curve
  points), and the recorded wall-clock is their sum. A timed region that
  compiled (e.g. the warm-up epoch removed) fails the first check."""
  import jax  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  clock, compiles, points = [], [], []
  real = time.perf_counter

  class Clock:  # compare's ``time`` module, recording every reading
    @staticmethod
    def perf_counter():
      clock.append(real())
      return clock[-1]

  def on_event(event, duration, **_):
    if "compile" in event or "trace" in event or "mlir" in event:
      compiles.append((real() - duration, real()))

  def point(self, *args, **kwargs):
    start = real()
    out = original_point(self, *args, **kwargs)
    points.append((start, real()))
    return out

  original_point = compare.MethodRunner.point
  monkeypatch.setattr(compare, "time", Clock)
  monkeypatch.setattr(compare.MethodRunner, "point", point)
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    config = compare.CompareConfig(epochs=3, num_samples=400, hidden=(16,), seeds=(0,),
                                   batch_size=32, methods=("usgd", "rais"))
    results = compare.run_compare(config, plots=False, quiet=True)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  timed = list(zip(clock[::2], clock[1::2]))
  assert len(clock) % 2 == 0 and len(timed) >= 4
  assert compiles and points  # the listeners saw something
  overlaps = lambda a, b: a[0] < b[1] and b[0] < a[1]
  assert not [c for c in compiles for t in timed if overlaps(c, t)]
  assert not [p for p in points for t in timed if overlaps(p, t)]
  runs = results["runs"]
  recorded = sum(r["0"]["curve"][-1]["wall_clock_s"] for r in runs.values())
  np.testing.assert_allclose(recorded, sum(b - a for a, b in timed), rtol=1e-9)
