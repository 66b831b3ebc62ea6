"""RAIS-SGD vs plain SGD and the O-SGD oracle on MNIST-1D: the README's main job.

    python examples/mnist1d_rais_vs_sgd.py [any `rais-jax compare` flag]

The same as ``rais-jax compare --dataset mnist1d --out runs/mnist1d``: an MLP
40-256-256-10 trained for 30 epochs with each method and seeds 0, 1, 2 (MNIST-1D
is generated in memory, never downloaded). It writes
``runs/mnist1d/results.json`` (curves and the time-to-target summary) and the
plots (``loss_vs_epochs.png``, ``loss_vs_wall_clock.png``, ``loss_vs_epochs_equivalent.png``,
``test_accuracy.png``, ``gain_ratio.png``, ``cost_per_step.png``,
``learned_c_d.png``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from rais_jax.experiments import cli


def main(argv: Optional[Sequence[str]] = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  return cli.run(["compare", "--dataset", "mnist1d", "--out", "runs/mnist1d",
                  *argv])


if __name__ == "__main__":
  main()
