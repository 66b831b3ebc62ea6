"""The library type-checks: mypy over rais_jax/ (configured in pyproject.toml)."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_mypy_finds_no_errors(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
