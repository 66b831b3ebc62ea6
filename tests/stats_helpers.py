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
