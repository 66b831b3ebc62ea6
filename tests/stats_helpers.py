"""Statistical helpers shared by the sampling tests."""

import numpy as np
from scipy import stats


def pool(keep, *columns):
  """Keeps cells where ``keep``; sums the rest into one cell (if any)."""
  return [np.append(x[keep], x[~keep].sum()) if (~keep).any() else x[keep]
          for x in columns]


def pooled_chisquare_pvalue(counts, expected):
  """Chi-square goodness of fit, cells expecting < 5 pooled so that the
  chi-square approximation holds. Under a correct sampler the p-value is
  uniform on [0, 1]: a threshold of 1e-3 fails one seed in a thousand."""
  obs, exp = pool(expected >= 5, counts, expected)
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def gradients_along(p, dim=3, spread=0.2, seed=1):
  """Per-example gradients g_i = n·p_i·(1 + spread·z_i), z_i ~ N(0, I): large
  where p is large, as importance sampling assumes. Then w_i·g_i is nearly
  constant, the estimator's spread is small, and a mismatch between the p an
  index was drawn with and the p it is weighted with moves the mean by many
  standard errors (N(0, 1) gradients unrelated to p hide it in their noise)."""
  p = np.asarray(p, np.float64)
  z = np.random.default_rng(seed).normal(size=(p.size, dim))
  return p.size * p[:, None] * (1 + spread * z)


def max_gradient_z(indices, weights, grads):
  """max over coordinates of |z| of the mean over draws of each step's
  (1/m) Σ_k w_k g_k against (1/n) Σ_i g_i; steps are the rows of
  ``indices``/``weights`` (any leading shape, last axis m), assumed i.i.d."""
  idx = np.asarray(indices).reshape(-1, np.shape(indices)[-1])
  w = np.asarray(weights, np.float64).reshape(idx.shape)
  est = np.einsum("sm,smd->sd", w, grads[idx]) / idx.shape[1]
  se = est.std(0, ddof=1) / np.sqrt(len(est))
  return float(np.max(np.abs(est.mean(0) - grads.mean(0)) / se))


def assert_unbiased_with_power(indices, weights, p, *, mismatch=0.01):
  """The importance-weighted gradient's mean equals the full gradient
  (|z| < 4.5 per coordinate: a correct sampler fails with probability ~2e-5
  each), on gradients correlated with p; and, as a positive control on the
  same draws, weights computed from a p that is ``mismatch`` (relative) too
  high on the examples of the first half of the index range are rejected.
  Returns (z of the draws, z of the control)."""
  n = np.size(p)
  grads = gradients_along(p)
  z = max_gradient_z(indices, weights, grads)
  assert z < 4.5, z
  wrong = np.asarray(weights, np.float64) / (
      1 + mismatch * (np.asarray(indices) < n // 2))
  z_wrong = max_gradient_z(indices, wrong, grads)
  assert z_wrong > 4.5, (mismatch, z_wrong)
  return z, z_wrong
