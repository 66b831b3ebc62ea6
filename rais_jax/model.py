"""Models with state and randomness: BatchNorm, dropout, augmentation.

A plain model is ``model_fn(params, batch) -> outputs``: deterministic and
stateless. :class:`StatefulModel` is the form for the models people train:

    apply(params, model_state, batch, key, train) -> (outputs, new_model_state)

``model_state`` is the model's mutable, untrained state (BatchNorm's running
statistics; ``()`` if none); ``key`` its randomness for this step (dropout;
None in inference); ``train`` (a Python bool) selects training or inference
mode. Both drivers carry the model state in :class:`rais_jax.TrainState`
(through the scan, donated, checkpointed, replicated with the rest) and give
each step its own key, ``fold_in`` of the block's key and the step number
(:func:`step_keys`), so a run stays a function of its key, a resumed run
continues bit-identically, and every method sees the same dropout masks and
augmentations at the same step of the same draw.

An ``augment(key, example) -> example`` (:mod:`rais_jax.augment`) is applied
per example on device after the gather (or the loader's fetch), each with
its own key. The sampler's features, records and norms stay indexed by the
original example: what it learns is the gradient norm of one random view of
each example, and the gradient stays unbiased because each example's weight
uses the p its index was drawn with, whatever view it is given.

Per-example norms of a model in training mode: where each example's loss
reads only its own example (dropout, augmentation, LayerNorm), they are the
norms of the per-example gradients, exactly. BatchNorm in training mode
couples the examples of a batch (each output depends on the batch's
statistics), so a per-example gradient is not defined; rais-jax then uses
each example's *share* of the true training-mode gradient: at every use of a
parameter, that example's rows of the use's input times their rows of the
true output cotangent (which includes the statistics' coupling), so the
shares sum to the minibatch gradient exactly. Ghost norms compute them in
the same single backward pass (see :func:`rais_jax.value_grad_and_norms`,
``coupled=True``), where the loss traced at the batch's size lines up with
the one-example trace (BatchNorm that scales its normalised input, as
:class:`rais_jax.experiments.models.BatchNorm` does). That is
``norms="exact"``; the default, ``norms="auto"``, measures proxy norms for a
coupled loss instead (the norm of each example's rows of ∂L/∂outputs from the
same backward pass: about one plain backward pass where the shares cost about
two on CPU, for the same epochs on the benchmarks' ResNet), and exact ones
for every other.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import chex
import jax

PyTree = Any
ModelFn = Callable[[PyTree, PyTree], chex.Array]
ApplyFn = Callable[[PyTree, PyTree, PyTree, Optional[chex.PRNGKey], bool],
                   tuple[chex.Array, PyTree]]

# Streams folded into a block's key: the draw uses the key itself.
_STEP_STREAM = 0x5374  # "St"


class StatefulModel(NamedTuple):
  """A model with mutable state and randomness (see the module): ``apply(params,
  model_state, batch, key, train) -> (outputs, new_model_state)``. In
  inference (``train=False``) ``key`` is None and the returned state is
  ignored."""

  apply: ApplyFn


def as_stateful(model: ModelFn | StatefulModel) -> tuple[StatefulModel, bool]:
  """(the model in the stateful form, whether it was given as one)."""
  if isinstance(model, StatefulModel):
    return model, True
  if not callable(model):
    raise TypeError(f"model_fn must be a function (params, batch) -> outputs or "
                    f"a rais_jax.StatefulModel; got {type(model).__name__}.")
  return StatefulModel(lambda p, s, b, k, t: (model(p, b), s)), False


def inference(model: ModelFn | StatefulModel, model_state: PyTree = ()) -> ModelFn:
  """``model_fn(params, batch)`` of ``model`` in inference mode with this
  state (e.g. for :func:`rais_jax.evaluate`)."""
  stateful, _ = as_stateful(model)
  return lambda params, batch: stateful.apply(params, model_state, batch, None,
                                              False)[0]


def training_loss(model: StatefulModel, loss_head: Callable[[chex.Array, PyTree], chex.Array],
                  model_state: PyTree, key: Optional[chex.PRNGKey]
                  ) -> Callable[[PyTree, PyTree], tuple[chex.Array, PyTree]]:
  """``loss(params, batch) -> (per-example losses, new model state)`` of
  ``model`` in training mode with this state and key."""

  def loss(params: PyTree, batch: PyTree) -> tuple[chex.Array, PyTree]:
    outputs, new_state = model.apply(params, model_state, batch, key, True)
    return loss_head(outputs, batch), new_state

  return loss


def step_keys(key: chex.PRNGKey, steps: chex.Array) -> chex.PRNGKey:
  """The keys of steps ``steps`` (global step numbers) drawn in a block
  whose key is ``key``: ``fold_in(fold_in(key, stream), step)``. Each step
  splits its key into the model's key and the augmentation's."""
  base = jax.random.fold_in(key, _STEP_STREAM)
  return jax.vmap(lambda s: jax.random.fold_in(base, s))(steps)
