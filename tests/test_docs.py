"""The reference docs (docs/, Sphinx with autodoc) build with warnings as errors."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_docs_build_without_warnings(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
       "-E", str(ROOT / "docs"), str(tmp_path / "html")],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-5000:]
  api = (tmp_path / "html" / "api.html").read_text()
  assert "make_runner" in api and "selective_backprop" in api
