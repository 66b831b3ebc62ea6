"""The library without the experiment extras: `pip install rais-jax` pulls jax,
optax, chex and numpy only, and RAIS trains with none of flax, orbax,
matplotlib, tqdm or mnist1d importable (a subprocess whose imports of them
fail, standing in for an environment without them)."""

import pathlib
import subprocess
import sys
import tomllib



ROOT = pathlib.Path(__file__).parents[1]
EXTRAS_ONLY = ("flax", "orbax", "matplotlib", "tqdm", "mnist1d")

SCRIPT = f"""
import importlib.abc, sys
BLOCKED = {EXTRAS_ONLY!r}
class Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ImportError("not installed: " + name)
sys.meta_path.insert(0, Block())

import jax, jax.numpy as jnp, numpy as np
import rais_jax as rj

rng = np.random.default_rng(0)
labels = rng.integers(0, 3, 256)
x = rng.normal(size=(256, 5)).astype(np.float32) + labels[:, None]
data = {{"x": jnp.asarray(x), "label": jnp.asarray(labels, jnp.int32)}}
params = {{"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}}
model_fn = lambda p, batch: batch["x"] @ p["w"] + p["b"]
sampler = rj.rais_sampler(rj.default_features(labels, 3), batch_size=16)
runner = rj.make_runner(model_fn, rj.softmax_cross_entropy_head(),
                        rj.rais_sgd(0.1, momentum=0.9), sampler, block_size=4)
with runner:
  state, metrics = runner.run(runner.init(params), jax.random.key(0), data, 64)
assert bool(jnp.all(jnp.isfinite(metrics.loss)))
assert int(state.sampler.diagnostics.pt_solves) >= 2
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
assert not loaded, loaded
for module, extra in (("experiments", "experiments"), ("checkpoint", "checkpoint")):
  try:
    __import__("rais_jax." + module)
  except ImportError as e:
    assert "rais-jax[" + extra + "]" in str(e), e
  else:
    raise AssertionError("rais_jax." + module + " imported without its extra")
print("core ok")
"""


def test_core_dependencies_exclude_the_extras():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  core = " ".join(project["dependencies"])
  assert not [name for name in EXTRAS_ONLY if name in core], core
  extras = project["optional-dependencies"]
  assert {"experiments", "checkpoint", "dev"} <= set(extras)


def test_a_rais_run_with_none_of_the_extras():
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "core ok" in out.stdout
