"""This version's step against another version's, side by side in one process.

    python benchmarks/bench_versions.py --old-ref REF [MLP flags of common.py]
    python benchmarks/bench_versions.py --old-dir DIR ...   # DIR/rais_jax: an unpacked copy

The other version's ``rais_jax`` package (``git archive REF rais_jax``, or a
copy in ``DIR``) is imported as ``rais_jax_old`` (its imports rewritten), so
that both run on the same MLP, data and keys, timed round-robin with warm-up
(medians): the fast path (U-SGD and RAIS with exact norms and asynchronous
(PT), one (PT) period per call) and the per-step API (RAIS). A refactor that
should not change the step shows ratios new/old within the run-to-run noise,
which the plain optax SGD scan timed beside them gauges (its two copies).
"""

from __future__ import annotations

import functools
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import optax

import rais_jax as rj

from common import (carried, interleaved_medians,  # pylint: disable=g-bad-import-order
                    parse_mlp_arguments, plain_sgd_step, synthetic_mlp_problem, write)

REPO = pathlib.Path(__file__).resolve().parent.parent


def import_old(old_dir: pathlib.Path | None, ref: str | None):
  """The other version's package, as ``rais_jax_old``."""
  work = pathlib.Path(tempfile.mkdtemp(prefix="rais-jax-old-"))
  if old_dir is None:
    archive = subprocess.run(["git", "archive", ref, "rais_jax"], cwd=REPO,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    src = work / "rais_jax"
  else:
    src = old_dir / "rais_jax"
  dst = work / "rais_jax_old"
  for path in src.rglob("*.py"):
    out = dst / path.relative_to(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(re.sub(r"\brais_jax\b", "rais_jax_old", path.read_text()))
  sys.path.insert(0, str(work))
  return importlib.import_module("rais_jax_old")


def main(argv=None):
  def more(p):
    p.add_argument("--old-ref", default=None, help="a git ref of this repository")
    p.add_argument("--old-dir", type=pathlib.Path, default=None,
                   help="a directory holding the other version's rais_jax/")
  args = parse_mlp_arguments(argv, repeats=9, more=more)
  if (args.old_ref is None) == (args.old_dir is None):
    raise SystemExit("give one of --old-ref and --old-dir")
  old = import_old(args.old_dir, args.old_ref)
  n, m, k = args.n, args.batch_size, args.block_size
  data, labels, model_fn, params, size = synthetic_mlp_problem(args)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  variants, steps = {}, None
  for tag, lib in (("new", rj), ("old", old)):
    head = lib.softmax_cross_entropy_head()
    rais = lambda lib=lib: lib.rais_sampler(lib.default_features(labels, 10),
                                            batch_size=m, pt_mode="async")
    for name, sampler, norms in (("U-SGD", lib.uniform_sampler(n, batch_size=m), None),
                                 ("RAIS", rais(), "exact")):
      runner = lib.make_runner(model_fn, head, lib.rais_sgd(0.01, momentum=0.9),
                               sampler, norms=norms, block_size=k)
      steps = runner.pt_period if name == "RAIS" else steps
      state = runner.init(params)
      if name == "RAIS":  # fitted: every timed step samples from the trees
        state, _ = runner.run(state, jax.random.key(1), data, 2 * runner.pt_period)
      variants[f"fast: {name} ({tag})"] = (runner, state)
  timed = {}
  for label, (runner, state) in variants.items():
    timed[label] = carried(lambda s, r=runner: r.run(s, jax.random.key(2), data, steps)[0],
                           state)
  call_keys = jax.random.split(jax.random.key(0), steps)
  for tag, lib in (("new", rj), ("old", old)):
    opt = lib.rais_sgd(0.01, momentum=0.9)
    sampler = lib.rais_sampler(lib.default_features(labels, 10), batch_size=m,
                               pt_mode="async")
    step = lib.make_train_step(model_fn, lib.softmax_cross_entropy_head(), opt, sampler)
    run = jax.jit(lambda s, d, ks, step=step: jax.lax.scan(
        lambda c, kk: step(c, kk, d), s, ks)[0], donate_argnums=0)
    state = run(lib.init_train_state(copy(params), opt, sampler), data, call_keys)
    timed[f"per step: RAIS ({tag})"] = carried(
        lambda s, run=run: run(s, data, call_keys), state)
  sgd = optax.sgd(0.01, momentum=0.9)
  plain_step = plain_sgd_step(model_fn, rj.softmax_cross_entropy_head(), sgd, m, n)
  plain = jax.jit(lambda c, ks, d: jax.lax.scan(
      functools.partial(plain_step, data=d), c, ks)[0], donate_argnums=0)
  for copy_ in ("a", "b"):
    timed[f"optax sgd (plain scan, {copy_})"] = carried(
        lambda c: plain(c, call_keys, data), copy((params, sgd.init(params))))
  medians = interleaved_medians(timed, repeats=args.repeats)
  rows = []
  for label, t in medians.items():
    row = {"variant": label, "ms/step": t / steps * 1e3, "new / old": "—"}
    if label.endswith("(new)"):
      row["new / old"] = t / medians[label.replace("(new)", "(old)")]
    rows.append(row)
  ref = args.old_ref or str(args.old_dir)
  md = write(args.name or f"versions_{size}_m{m}_{jax.default_backend()}", rows,
             ["variant", "ms/step", "new / old"],
             f"This version vs {ref}, MLP {size}, m={m}, n={n}, K={k}, {steps} steps "
             f"per call, {jax.devices()[0].device_kind}, median of {args.repeats}")
  print(md)


if __name__ == "__main__":
  main()
