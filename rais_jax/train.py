"""The per-step API: one jit-able step function that composes sampling, norms,
(PT) and optax.

    state, metrics = step(state, key, data)

draws m indices from the sampler, gathers the batch from ``data`` (a pytree
with leading axis n, kept on device) and runs the one training step
(:func:`rais_jax.step.train_step`, guarded against non-finite steps), folds
the measurements into the sampler, and does the period work as
``lax.cond``: the oracle's refresh and the (PT) hand-off
(:func:`rais_jax.pt.periodic.advance`). ``step`` is pure, so it can be
wrapped in ``jax.jit`` or driven by ``jax.lax.scan``. The fast path
(:func:`rais_jax.make_runner`) runs the same step in blocks of K.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import chex
import jax
import optax

from rais_jax.augment import Augment
from rais_jax.measure import LossHead, all_exact_norms
from rais_jax.model import ModelFn, StatefulModel, step_keys
from rais_jax.pt import periodic
from rais_jax.sampler import Sampler
from rais_jax.step import StepMetrics, StepSpec, TrainState, train_step

PyTree = Any


def make_train_step(model_fn: ModelFn | StatefulModel, loss_head: LossHead,
                    optimizer: optax.GradientTransformationExtraArgs,
                    sampler: Sampler, *, norms: Optional[str] = "auto",
                    oracle_period: Optional[int] = None,
                    oracle_chunk_size: Optional[int] = None,
                    exact_method: str = "ghost",
                    batch_sharding: Optional[jax.sharding.Sharding] = None,
                    augment: Optional[Augment] = None
                    ) -> Callable[[TrainState, chex.PRNGKey, PyTree],
                                  tuple[TrainState, StepMetrics]]:
  """Builds ``step(state, key, data) -> (state, metrics)``.

  Args:
    model_fn: ``(params, batch) -> outputs`` (e.g. logits), or a
      :class:`~rais_jax.StatefulModel` (BatchNorm, dropout: its state goes in
      :func:`rais_jax.init_train_state`; see :mod:`rais_jax.model`).
    loss_head: ``(outputs, batch) -> (m,)`` per-example losses.
    optimizer: an optax transformation whose updates use the ``gain_ratio``
      extra argument, e.g. :func:`rais_jax.rais_sgd`, or
      ``optax.chain(optax.scale_by_adam(), rais_jax.scale_by_gain_ratio(lr))``;
      one that ignores it (a stock ``optax.sgd`` or ``optax.adam``) is
      refused at trace time for samplers that raise the learning rate
      (RAIS, O-SGD, naive). U-SGD takes any optimizer.
    sampler: a :class:`~rais_jax.Sampler` (any method but those that plan
      whole epochs, such as InfoBatch: train those with
      :meth:`rais_jax.Runner.run_epoch`).
    norms: how u_k is measured: ``"auto"`` (default): ``"exact"``, or
      ``"proxy"`` for a :class:`~rais_jax.StatefulModel` whose training-mode
      loss couples examples (BatchNorm) when m is even (its exact shares cost
      about two plain backward passes on CPU, its proxy norms about one, for
      the same epochs: ``benchmarks/results/frontier_fashion-resnet-augment.md``);
      ``"exact"`` (the gradient and the
      exact norms from :func:`rais_jax.value_grad_and_norms`, with ghost
      norms one backward pass; the gain ratio uses them directly),
      ``"proxy"`` (‖∂f_k/∂outputs_k‖ from the same backward pass, split into
      two half-batches for the scale-free gain ratio; m must be even; a
      :class:`~rais_jax.StatefulModel` runs its whole batch at once and, for
      the halves, its backward pass twice, or once if its loss couples
      examples: then r is the norms' moment ratio, :mod:`rais_jax.gain_ratio`). A
      sampler that measures no norms gets none (None is allowed only there).
    oracle_period: for a sampler with ``refresh`` (O-SGD), refresh the exact
      norms of all n examples every this many steps (default 1: the true
      oracle; each refresh costs n per-example gradients).
    oracle_chunk_size: examples per chunk in that refresh (default m).
    exact_method: how exact norms are computed, for ``norms="exact"`` and the
      oracle refresh: ``"ghost"`` (default), ``"vmap"`` (the reference) or
      ``"auto"`` (the faster of the two, measured once per shape:
      :func:`rais_jax.choose_method`).
    batch_sharding: data parallelism: a sharding for the sampled batch (leading
      axis m), e.g. ``NamedSharding(mesh, P("data"))``. The m examples are
      then spread over the devices, and the forward and backward passes and
      the per-example norms are computed where they live; the sampler state,
      the parameters and ``data`` stay as they are (replicated by default).
      Over several devices the sampler must use ``pt_mode="sync"``: an
      asynchronous (PT) solve inside a multi-device computation deadlocked
      (CPU, 2 and 4 simulated devices), so that is refused.
    augment: ``augment(key, example) -> example``, applied on device to each
      example of the step (:mod:`rais_jax.augment`). The step's key for the
      model and the augmentation is ``step_keys(key, state.step)``.

  Returns:
    The step function.
  """
  if sampler.plan_epoch is not None:
    raise ValueError(
        f"the {sampler.name!r} sampler plans whole epochs: train it with "
        "rais_jax.make_runner and Runner.run_epoch.")
  spec = StepSpec(model_fn, loss_head, optimizer, sampler, norms=norms,
                  exact_method=exact_method, batch_sharding=batch_sharding,
                  augment=augment)
  if (batch_sharding is not None and len(batch_sharding.device_set) > 1
      and sampler.pt_mode == "async"):
    raise ValueError(
        "batch_sharding spans several devices, and an asynchronous (PT) solve "
        "inside a multi-device computation deadlocks (its host callback waits "
        "for a solve that cannot run while the devices wait for it). Build "
        "the sampler with rais_sampler(..., pt_mode='sync').")
  return functools.partial(
      per_step, spec, 1 if oracle_period is None else oracle_period,
      sampler.batch_size if oracle_chunk_size is None else oracle_chunk_size)


def per_step(spec: StepSpec, oracle_period: int, oracle_chunk: int,
             state: TrainState, key: chex.PRNGKey, data: PyTree
             ) -> tuple[TrainState, StepMetrics]:
  """One step of the per-step API: the oracle's refresh when due (``cond``),
  the draw of m indices, the one guarded step, the fold-in, the (PT)
  hand-off (:func:`rais_jax.pt.periodic.advance`)."""
  sampler = spec.sampler
  spec.check_on_data(state.params, data, state.model_state)
  sampler_state = state.sampler
  if sampler.refresh is not None:
    refresh = sampler.refresh
    sampler_state = jax.lax.cond(
        state.step % oracle_period == 0,
        lambda s: refresh(s, all_exact_norms(
            spec.eval_loss_fn(state.model_state), state.params, data,
            chunk_size=oracle_chunk, method=spec.exact_method)),
        lambda s: s, sampler_state)
  drawn = sampler.sample(sampler_state, key)
  chooser = sampler_state if sampler.select is not None else None
  carry = (state.params, state.opt_state, state.moments, state.skipped_steps,
           chooser, state.model_state)
  xs = (drawn, step_keys(key, state.step[None])[0]) if spec.keyed else drawn
  carry, (measured, metrics) = train_step(
      spec, data, sampler_state, carry, xs, guarded=True, measure_grad=True)
  params, opt_state, moments, skipped, chooser, model_state = carry
  if chooser is not None:
    sampler_state = chooser
  sampler_state = sampler.fold_in(sampler_state, drawn, measured)
  new_step = state.step + 1
  if sampler.pt is not None:
    sampler_state = periodic.advance(sampler.pt, sampler_state, new_step)
  return TrainState(params=params, opt_state=opt_state, sampler=sampler_state,
                    moments=moments, step=new_step, skipped_steps=skipped,
                    model_state=model_state), metrics
