"""RAIS with your own data loader: training examples streamed from disk.

    python examples/memmap_loader.py [--epochs 10] [--dir DIR]

The training set never goes to the device whole: it is written once to
``.npy`` files and opened as NumPy memmaps, and each block of K steps reads
only the K·m rows the sampler drew (``Runner.run`` with a loader function in
place of the data). Only the labels are read whole, for RAIS's features. The
same works for any random-access source (grain's data sources, TFDS, a
database): the loader maps a (K, m) array of indices to a batch pytree with
leading axes (K, m).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np
from flax import nnx

import rais_jax as rj
from rais_jax.experiments import data as data_lib
from rais_jax.experiments.models import MLP, functional


def write_training_set(directory: pathlib.Path, num_samples: int) -> dict:
  """MNIST-1D (generated locally) saved as .npy files; returns the test set."""
  raw = data_lib.load_dataset("mnist1d", num_samples=num_samples)
  np.save(directory / "x_train.npy", raw["x_train"])
  np.save(directory / "y_train.npy", raw["y_train"])
  return {"x": raw["x_test"], "label": raw["y_test"]}


def memmap_loader(directory: pathlib.Path):
  """(loader, labels): the loader reads the drawn rows from the memmaps."""
  x = np.load(directory / "x_train.npy", mmap_mode="r")
  y = np.load(directory / "y_train.npy", mmap_mode="r")

  def load(indices: np.ndarray) -> dict:
    # Fancy indexing a memmap reads just those rows (duplicates included).
    return {"x": np.asarray(x[indices]), "label": np.asarray(y[indices])}

  return load, np.asarray(y)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--num-samples", type=int, default=10_000)
  p.add_argument("--dir", default=None, help="where to write the .npy files "
                 "(default: a temporary directory)")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(args.dir or tmp)
    directory.mkdir(parents=True, exist_ok=True)
    test = write_training_set(directory, args.num_samples)
    load, labels = memmap_loader(directory)
    n, m = len(labels), args.batch_size
    steps = n // m
    model_fn, params = functional(MLP(test["x"].shape[1], [256, 256], 10,
                                      rngs=nnx.Rngs(0)))
    head = rj.softmax_cross_entropy_head()
    sampler = rj.rais_sampler(rj.default_features(labels, 10), batch_size=m)
    # K: divides an epoch, at most 25 and half a (PT) period (see make_runner).
    limit = min(25, max(1, sampler.pt.period // 2))
    k = max(d for d in range(1, limit + 1) if steps % d == 0)
    runner = rj.make_runner(model_fn, head, rj.rais_sgd(0.05, momentum=0.9),
                            sampler, block_size=k)
    evaluate = jax.jit(lambda p: rj.evaluate(model_fn, head, p, test))
    state, key, history = runner.init(params), jax.random.key(0), []
    with runner:
      for epoch in range(1, args.epochs + 1):
        state, metrics = runner.run(state, key, load, steps)
        result = evaluate(state.params)
        history.append({"epoch": epoch, "train_loss": float(metrics.loss.mean()),
                        "test_accuracy": float(result["accuracy"]),
                        "gain_ratio": float(metrics.gain_ratio.mean())})
        print(f"epoch {epoch}: weighted minibatch loss "
              f"{history[-1]['train_loss']:.4f}, test accuracy "
              f"{history[-1]['test_accuracy']:.4f}, r {history[-1]['gain_ratio']:.2f}",
              flush=True)
  return history


if __name__ == "__main__":
  main()
