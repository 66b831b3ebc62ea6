"""The README's main job runs end to end (tiny settings)."""

import importlib.util
import json
import pathlib

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "mnist1d_rais_vs_sgd.py"


def test_main_job_writes_curves(tmp_path):
  spec = importlib.util.spec_from_file_location("example", EXAMPLE)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  example.main(["--epochs", "2", "--num-samples", "600", "--hidden", "32",
                "--seeds", "0", "--out", str(tmp_path)])
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["runs"]) == {"usgd", "rais", "osgd"}
  for by_seed in results["runs"].values():
    curve = by_seed["0"]["curve"]
    assert [p["epoch"] for p in curve] == [0, 1, 2]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]
  assert (tmp_path / "loss_vs_wall_clock.png").stat().st_size > 0
