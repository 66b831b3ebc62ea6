"""(PT) solve time and agreement with an independent reference (SciPy SLSQP).

    python benchmarks/bench_pt.py [--mnist1d-seeds 0 1]

Instances mimic RAIS's buffer D with the default features (constant, one-hot of
K = 10 classes, last norm, never-sampled flag; d_R = 13): log-normal true norms
scaled per class, last norms that are noisy copies of them, 80% of examples
seen, records drawn with p ∝ 0.5 v/Σv + 0.5/n. "warm" re-solves a fresh
buffer (another seed) from the previous solution, as the sampler does.

With ``--mnist1d-seeds`` it also solves, one by one, the snapshots that RAIS
submits on the README's main job (MNIST-1D, MLP, the defaults of
``rais-jax compare``), each warm-started from the previous solution as in
training, and reports the distribution of solve times and iterations.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import numpy as np
from scipy import optimize

import rais_jax as rj
from rais_jax.pt import service as pt_service
from rais_jax.experiments import compare

from common import time_call, write  # pylint: disable=g-bad-import-order


def instance(records: int, n: int, seed: int, classes: int = 10):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  v = rng.uniform(0.5, 3, classes)[y] * rng.lognormal(0, 1, n)
  seen = rng.uniform(size=n) < 0.8
  last = np.where(seen, v * rng.lognormal(0, 0.3, n), 0)
  feats = np.concatenate([np.ones((n, 1)), np.eye(classes)[y], last[:, None],
                          (~seen)[:, None]], 1).astype(np.float32)
  p = 0.5 * v / v.sum() + 0.5 / n
  idx = rng.choice(n, records, p=p)
  return feats[idx], v[idx].astype(np.float32), p[idx].astype(np.float32), feats.sum(0)


def scipy_reference(feats, norms, probs, s):
  """G_min = min G(c, d) over c, d ≥ 0 with ⟨d, S⟩ = 1 (the convex form of
  (PT), whose optimum equals (PT)'s ⟨d*, S⟩), by SLSQP in float64 with
  analytic gradients. Variables are rescaled to O(1): c = σ·x_c, d = x_d / S."""
  feats, norms, probs, s = (np.asarray(x, np.float64) for x in (feats, norms, probs, s))
  d_r, m = feats.shape[1], len(norms)
  sigma = np.sqrt(np.mean(norms**2))
  t = feats / s  # ⟨d, s̃_j⟩ = ⟨x_d, t_j⟩

  def parts(x):
    r = norms / sigma - feats @ x[:d_r]
    den = probs * (t @ x[d_r:])
    return r, np.maximum(den, 1e-300)

  def g_scaled(x):  # G / σ²
    r, den = parts(x)
    return np.mean(r**2 / den)

  def g_grad(x):
    r, den = parts(x)
    return np.concatenate([-2 * feats.T @ (r / den) / m,
                           -t.T @ (r**2 / den**2 * probs) / m])

  x0 = np.concatenate([np.zeros(d_r), np.full(d_r, 1.0 / d_r)])
  scale = g_scaled(x0)
  res = optimize.minimize(
      lambda x: g_scaled(x) / scale, x0, jac=lambda x: g_grad(x) / scale,
      method="SLSQP", bounds=[(0, None)] * (2 * d_r),
      constraints=[{"type": "eq", "fun": lambda x: x[d_r:].sum() - 1,
                    "jac": lambda x: np.concatenate([np.zeros(d_r), np.ones(d_r)])}],
      options={"maxiter": 5000, "ftol": 1e-14})
  return res.fun * scale * sigma**2, res.success


def main_job_snapshots(seed: int) -> list[list[np.ndarray]]:
  """The solve arguments RAIS submits on the main job with this seed, in
  order (recorded by wrapping :meth:`SolveService.submit_host`)."""
  snapshots = []
  submit = pt_service.SolveService.submit_host

  def recording(self, key, args):
    if key not in self:
      snapshots.append([np.array(a) for a in args])
    return submit(self, key, args)

  config = compare.CompareConfig(methods=("rais",), seeds=(seed,))
  with mock.patch.object(pt_service.SolveService, "submit_host", recording):
    compare.run_compare(config, plots=False, quiet=True)
  return snapshots


def snapshot_row(seed: int, repeats: int) -> dict:
  snapshots = main_job_snapshots(seed)
  times, iters, gaps = [], [], []
  for features, norms, probs, feature_sum, c, d in snapshots:
    solve = lambda: rj.solve_pt(features, norms, probs, feature_sum, init=(c, d))
    info = solve()[2]
    times.append(time_call(solve, repeats=repeats))
    iters.append(int(info.iterations))
    gaps.append(float(info.objective) / scipy_reference(features, norms, probs, feature_sum)[0] - 1)
  spread = lambda v, f: f"{f(np.median(v))} [{f(min(v))}, {f(max(v))}]"
  return {"MNIST-1D seed": seed, "solves": len(snapshots),
          "solve ms, median [min, max]": spread(1e3 * np.array(times), lambda x: f"{x:.2f}"),
          "iterations, median [min, max]": spread(iters, lambda x: f"{x:.0f}"),
          "total ms": round(1e3 * sum(times), 1),
          "objective / SciPy − 1, max": max(gaps)}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--records", type=int, nargs="+", default=[4096, 65536])
  p.add_argument("--n", type=int, default=60_000)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--mnist1d-seeds", type=int, nargs="*", default=[])
  args = p.parse_args(argv)
  rows = []
  for records in args.records:
    f, v, pr, s = instance(records, args.n, seed=0)
    f2, v2, pr2, s2 = instance(records, args.n, seed=1)
    c, d, info = rj.solve_pt(f, v, pr, s)
    _, _, warm_info = rj.solve_pt(f2, v2, pr2, s2, init=(c, d))
    cold_s = time_call(lambda: rj.solve_pt(f, v, pr, s), repeats=args.repeats)
    warm_s = time_call(lambda: rj.solve_pt(f2, v2, pr2, s2, init=(c, d)), repeats=args.repeats)
    start = time.perf_counter()
    ref_obj, ref_ok = scipy_reference(f, v, pr, s)
    ref_s = time.perf_counter() - start
    g = float(rj.pt.pt_constraint(c, d, f, v, pr))
    rows.append({
        "buffer size": records, "d_R": f.shape[1], "cold solve (s)": cold_s,
        "cold iters": int(info.iterations), "warm solve (s)": warm_s,
        "warm iters": int(warm_info.iterations), "converged": bool(info.converged),
        "objective / SciPy − 1": float(info.objective) / ref_obj - 1, "G(c,d)": g,
        "SciPy ok": bool(ref_ok), "SciPy time (s)": ref_s})
    print(rows[-1], flush=True)
  md = write("pt_solver", rows, list(rows[0]),
             f"(PT) solve (FISTA, float32, jit) vs SciPy SLSQP (float64), median of {args.repeats}")
  print(md)
  if args.mnist1d_seeds:
    rows = [snapshot_row(seed, args.repeats) for seed in args.mnist1d_seeds]
    print(write("pt_solver_mnist1d", rows, list(rows[0]),
                "(PT) on the snapshots RAIS submits on the main job, warm-started "
                f"as in training; each solve the median of {args.repeats}"))


if __name__ == "__main__":
  main()
