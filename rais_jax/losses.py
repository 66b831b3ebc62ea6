"""Loss heads and evaluation over a whole data set."""

from __future__ import annotations

from typing import Any

import chex
import jax.numpy as jnp
import optax

from rais_jax.measure import LossHead, chunked_map
from rais_jax.model import ModelFn

PyTree = Any


def softmax_cross_entropy_head(label_key: str = "label") -> LossHead:
  """Per-example softmax cross-entropy against ``batch[label_key]``.

  A label outside [0, C) for C logits gives a NaN loss (optax's would be
  NaN above C but wrap a negative label onto a class): the step that draws
  it is skipped and counted (:attr:`TrainState.skipped_steps`, with a
  warning from :meth:`Runner.run`), and :func:`evaluate` counts it.
  """

  def head(logits: chex.Array, batch: PyTree) -> chex.Array:
    labels = batch[label_key]
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)
    valid = (labels >= 0) & (labels < logits.shape[-1])
    return jnp.where(valid, losses, jnp.nan)

  return head


def evaluate(model_fn: ModelFn, loss_head: LossHead, params: PyTree,
             data: PyTree, *, label_key: str = "label",
             chunk_size: int = 1024) -> dict[str, chex.Array]:
  """Mean loss and accuracy over all of ``data`` (uniform weights).

  ``"nonfinite"`` counts the examples whose loss is not finite (NaN inputs,
  labels outside the model's classes): the mean loss is then NaN.
  """
  def chunk(batch):
    out = model_fn(params, batch)
    return loss_head(out, batch), jnp.argmax(out, -1) == batch[label_key]

  losses, correct = chunked_map(chunk, data, chunk_size)
  return {"loss": losses.mean(), "accuracy": correct.mean(),
          "nonfinite": jnp.sum(~jnp.isfinite(losses))}
