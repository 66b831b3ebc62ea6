"""The experiment app: ``rais-jax compare`` (U-SGD, RAIS, O-SGD and the
baselines side by side), its data sets, example models and plots.

Needs the ``experiments`` extra (flax, mnist1d, tqdm, matplotlib):
``pip install "rais-jax[experiments]"``. The library itself (``rais_jax``)
does not.
"""

import importlib.util



def _missing(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is None
  except ImportError:  # e.g. a broken install
    return True


_MISSING = [name for name in ("flax", "mnist1d", "tqdm", "matplotlib")
            if _missing(name)]
if _MISSING:
  raise ImportError(
      f"rais_jax.experiments needs {', '.join(_MISSING)}: install the extra "
      "with pip install \"rais-jax[experiments]\" (from a checkout: "
      "pip install -e \".[experiments]\").")
