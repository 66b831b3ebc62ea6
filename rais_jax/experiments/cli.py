"""Command line: ``rais-jax compare ...`` (also ``python -m rais_jax``)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional, Sequence

from rais_jax import norms as norms_lib
from rais_jax.experiments import compare
from rais_jax.step import NORMS

_DEFAULTS = compare.CompareConfig()


def _comma_list(kind: Callable[[str], Any], what: str
                ) -> Callable[[str], tuple[Any, ...]]:
  """A parser of comma-separated values (empty lists and ranges are checked
  by CompareConfig.validate, with the other settings)."""
  def parse(text: str) -> tuple[Any, ...]:
    try:
      return tuple(kind(s) for s in text.split(",") if s.strip())
    except ValueError:
      raise argparse.ArgumentTypeError(
          f"expected comma-separated {what}, got {text!r}") from None
  return parse


_ints = _comma_list(int, "integers")
_floats = _comma_list(float, "numbers")


def _methods(text: str) -> tuple[str, ...]:
  # Checked, with the other settings, by CompareConfig.validate.
  return tuple(s.strip() for s in text.split(",") if s.strip())


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="rais-jax", description="RAIS: robust, approximate importance "
      "sampling for SGD (Johnson & Guestrin, 2018).")
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser(
      "compare", help="train U-SGD, RAIS-SGD, O-SGD and baselines side by side",
      description=compare.__doc__.split("\n\n")[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  c.add_argument("--dataset", default=_DEFAULTS.dataset,
                 help="mnist1d (generated, no download), fashion-mnist (local "
                 "IDX files) or npz:PATH (arrays x_train, y_train, x_test, "
                 "y_test)")
  c.add_argument("--model", choices=list(compare.MODELS), default=_DEFAULTS.model,
                 help="resnet: a small pre-activation ResNet with BatchNorm")
  c.add_argument("--augment", action="store_true",
                 help="random crop (padding 2) and horizontal flip of every "
                      "training example, on device (images)")
  c.add_argument("--dropout", type=float, default=_DEFAULTS.dropout,
                 help="dropout rate of the mlp's or resnet's hidden layers")
  c.add_argument("--unroll", action="store_true",
                 help="compile each block's steps unrolled: for convolutional "
                      "models on CPU (XLA runs convolutions in loops slowly)")
  c.add_argument("--methods", type=_methods, default=",".join(_DEFAULTS.methods),
                 help="comma-separated, of: " + ", ".join(compare.METHODS))
  c.add_argument("--epochs", type=int, default=_DEFAULTS.epochs)
  c.add_argument("--seeds", type=_ints,
                 default=",".join(map(str, _DEFAULTS.seeds)),
                 help="comma-separated seeds (initialisation and sampling)")
  c.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
  c.add_argument("--lr", type=float, default=_DEFAULTS.lr,
                 help="base learning rate (RAIS scales it by r)")
  c.add_argument("--lr-schedule", choices=compare.SCHEDULES,
                 default=_DEFAULTS.lr_schedule,
                 help="decay over the run's steps; RAIS and O-SGD index it by τ "
                 "and stop when it is spent")
  c.add_argument("--momentum", type=float, default=_DEFAULTS.momentum)
  c.add_argument("--budgets", type=_floats, default=_DEFAULTS.budgets,
                 help="the budget-matched frontier: U-SGD also runs with its "
                 "schedule fully decayed over each of these fractions of "
                 "--epochs (1 is always added), e.g. 0.4,0.55,0.7,0.85,1")
  c.add_argument("--lrs", type=_floats, default=_DEFAULTS.lrs,
                 help="base learning rates of the frontier (--lr is added): "
                 "U-SGD runs at each budget and lr, the other methods at each lr")
  c.add_argument("--norms", choices=list(NORMS), default=_DEFAULTS.norms,
                 help="RAIS's per-example gradient norms: exact ghost norms "
                 "(the exact gain ratio), the softmax-logit proxy (scale-free "
                 "gain ratio), or auto (default: exact, proxy for a model "
                 "whose training-mode loss couples examples, e.g. BatchNorm)")
  c.add_argument("--exact-method", choices=list(norms_lib.METHODS),
                 default=_DEFAULTS.exact_method,
                 help="how exact norms are computed: ghost norms (one backward "
                 "pass), vmap of per-example gradients, or auto (the faster of "
                 "the two, measured once per run)")
  c.add_argument("--r-max", type=float, default=_DEFAULTS.r_max,
                 help="upper clip of the gain ratio (default: the batch size)")
  c.add_argument("--oracle-period", type=int, default=_DEFAULTS.oracle_period,
                 help="O-SGD recomputes all n exact norms every this many steps")
  c.add_argument("--block-size", type=int, default=_DEFAULTS.block_size,
                 help="steps per block of the fast path (at most this: the "
                 "largest divisor of the steps per epoch; 1 = per-step sampling)")
  c.add_argument("--floor", type=float, default=_DEFAULTS.floor,
                 help="uniform floor ε of rais, naive and loss-is; None: the "
                 "samplers' own, 1e-3 (osgd keeps its 0.3)")
  c.add_argument("--sb-beta", type=float, default=_DEFAULTS.sb_beta,
                 help="Selective-Backprop's selectivity β: a candidate is "
                 "backpropagated with probability (its loss percentile)^β")
  c.add_argument("--infobatch-ratio", type=float, default=_DEFAULTS.infobatch_ratio,
                 help="InfoBatch's prune ratio: the fraction of the below-mean-"
                 "loss examples left out each epoch")
  c.add_argument("--infobatch-delta", type=float, default=_DEFAULTS.infobatch_delta,
                 help="InfoBatch's annealing: the epochs after the first "
                 "⌊δ·epochs⌋ use the full data")
  c.add_argument("--hidden", type=int, nargs="+", default=list(_DEFAULTS.hidden),
                 help="MLP hidden widths")
  c.add_argument("--num-samples", type=int, default=_DEFAULTS.num_samples,
                 help="MNIST-1D examples (train + test)")
  c.add_argument("--data-dir", default=None,
                 help="directory with the Fashion-MNIST IDX files (else "
                 "$RAIS_DATA_DIR, else Debian's install directory)")
  c.add_argument("--out", default="runs/compare",
                 help="output directory for results.json and the plots")
  c.add_argument("--no-plots", action="store_true")
  c.add_argument("--quiet", action="store_true",
                 help="no progress bars (shown on a terminal only anyway) and no "
                 "line per run: just the summary")
  return p


def parse(argv: Optional[Sequence[str]] = None
          ) -> tuple[compare.CompareConfig, argparse.Namespace]:
  """The :class:`~rais_jax.experiments.compare.CompareConfig` ``argv`` asks
  for, and the parsed arguments."""
  args = parser().parse_args(argv)
  # Every CompareConfig field has the flag of its name (--batch-size: batch_size).
  config = compare.CompareConfig(**{
      f.name: getattr(args, f.name) for f in dataclasses.fields(compare.CompareConfig)
  } | {"hidden": tuple(args.hidden)})
  return config, args


def run(argv: Optional[Sequence[str]] = None) -> dict:
  """Parses ``argv`` and runs the command; returns its results."""
  config, args = parse(argv)
  try:
    results = compare.run_compare(config, args.out, plots=not args.no_plots,
                                  quiet=args.quiet)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"rais-jax compare: {e}") from None
  print(compare.format_summary(results["summary"]))
  print(f"wrote {args.out}/results.json" + ("" if args.no_plots else
                                            " and plots"))
  return results


def main(argv: Optional[Sequence[str]] = None) -> int:
  run(argv)
  return 0
