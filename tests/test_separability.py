"""Losses that couple examples are refused by both exact methods."""

import jax
import jax.numpy as jnp
import pytest

import rais_jax as rj
from rais_jax.testing import zoo

M = 6


def _coupled_losses():
  problem = zoo.mlp(M)

  def batch_norm(p, b):  # BatchNorm in training mode: batch statistics
    x = b["x"]
    x = (x - x.mean(0)) / jnp.sqrt(x.var(0) + 1e-5)
    return problem.loss_fn(p, {**b, "x": x})

  def centred(p, b):  # a batch-level reduction
    losses = problem.loss_fn(p, b)
    return losses - losses.mean()

  return problem, {"batch_norm": batch_norm, "centred": centred}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_coupled_losses_are_refused(method):
  problem, losses = _coupled_losses()
  with pytest.raises(ValueError, match="couples examples"):
    jax.jit(lambda p, b: rj.per_example_grad_norms(
        losses["batch_norm"], p, b, method=method))(problem.params, problem.batch)
  with pytest.raises(ValueError, match="couples examples"):
    rj.value_grad_and_norms(losses["centred"], problem.params, problem.batch,
                            method=method)
  # The check can be skipped (the norms then belong to no well-defined
  # per-example loss: ghost's batched pass sees the batch, vmap one example).
  norms = jax.jit(lambda p, b: rj.per_example_grad_norms(
      losses["batch_norm"], p, b, method=method, separable_check=False))(
          problem.params, problem.batch)
  assert norms.shape == (M,)


def test_separable_losses_pass():
  problem = zoo.mlp(M)
  rj.separability.check_separable(problem.loss_fn, problem.params, problem.batch)
