"""The examples run end to end (tiny settings): the README's main job, and
RAIS fed by a loader that reads a memmap on disk."""

import importlib.util
import json
import pathlib

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _load(name):
  spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  return example


def test_memmap_loader_example(tmp_path):
  history = _load("memmap_loader").main(["--epochs", "3", "--num-samples", "1000",
                                         "--dir", str(tmp_path)])
  assert (tmp_path / "x_train.npy").exists()
  assert history[-1]["train_loss"] < history[0]["train_loss"]
  assert history[-1]["test_accuracy"] > history[0]["test_accuracy"]


def test_main_job_writes_curves(tmp_path):
  example = _load("mnist1d_rais_vs_sgd")
  example.main(["--epochs", "2", "--num-samples", "600", "--hidden", "32",
                "--seeds", "0", "--out", str(tmp_path), "--lrs", "0.1", "--budgets", "0.5"])
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["runs"]) == {"usgd", "rais", "osgd"}
  for by_seed in results["runs"].values():
    curve = by_seed["0"]["curve"]
    assert [p["epoch"] for p in curve] == [0, 1, 2]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
  assert (tmp_path / "loss_vs_wall_clock.png").stat().st_size > 0
  # U-SGD's budgets (all and half of 2 epochs), the other methods' full one
  # (--lrs and --budgets cut short).
  budgets = sorted(r["budget_epochs"] for r in results["frontier"] if r["method"] == "usgd")
  assert budgets == [1.0, 2.0]
  assert "rais" in results["summary"]["methods"]
  assert results["summary"]["methods"]["rais"]["budget_matched_speedup"]["final_train_loss"]
  assert (tmp_path / "frontier_wall_clock.png").stat().st_size > 0
