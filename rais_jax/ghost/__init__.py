"""Exact per-example gradient norms from one backward pass (ghost norms).

For a dense layer y = x W that example k sees at positions t = 1..T,
∇_W f_k = Σ_t x_{kt} δ_{kt}ᵀ with δ_{kt} = ∂f_k/∂y_{kt}, so

    ‖∇_W f_k‖² = Σ_{t,t'} (x_{kt}·x_{kt'}) (δ_{kt}·δ_{kt'})        (Gram form)

(= ‖x_k‖²‖δ_k‖² when T = 1). x comes from the forward pass and every δ from
*one* ordinary backward pass, taken with respect to a zero perturbation added
to each layer output; the m per-example gradients are never formed (or, where
T(A + C) > A·C, formed because that is cheaper than the Gram matrices).
Goodfellow (2015), "Efficient per-example gradient computations"; Li et al.
(2022), "Large language models can be strong differentially private learners"
(ghost clipping).

This package does that for any JAX function by reading its jaxpr:

* :mod:`~rais_jax.ghost.walker` traces the loss of *one* example and finds the
  *sites*, the equations where a value that depends on the parameters but
  not on the data (a weight, or a transpose, cast or broadcast of one) meets
  the data. Every path from a parameter to the loss crosses exactly one
  site, so the per-example gradient is a sum over sites of the pull-back,
  through the parameter-only computation h, of the site's local per-example
  gradient. It inlines ``jit``, ``closed_call`` and ``remat`` and unrolls
  scans of at most ``MAX_UNROLL`` steps over stacked layers.
* :mod:`~rais_jax.ghost.kernels`: the Gram form per primitive (``dot_general``,
  ``conv_general_dilated`` over strided slices of the input, one per window
  offset, embedding ``gather``, a 2-D weight tied across sites).
* :mod:`~rais_jax.ghost.plan`: which leaf goes to which kernel; the rest
  (biases and scales broadcast into the data, parameters combined with each
  other, higher-order equations such as ``cond`` or a shared-weight
  ``scan``, with a warning) goes to
* :mod:`~rais_jax.ghost.pullback`: the local per-example gradient of each
  remaining site by ``vmap`` of that one equation's VJP, pulled back through
  h with all uses of a leaf summed before the norm (shared weights exact).
* :mod:`~rais_jax.ghost.batched` runs the pass on the loss traced at the
  batch's size (the user's own batched graph) where it lines up with the
  one-example trace, and :mod:`~rais_jax.ghost.backward` puts it together:
  :func:`value_grad_and_norms`.

The loss must be separable (one example's loss reads only that example):
:func:`rais_jax.value_grad_and_norms` checks it
(:mod:`rais_jax.separability`) and also offers ``method="vmap"`` and
``"auto"`` (the faster of the two, measured).
"""

from rais_jax.ghost.backward import value_grad_and_norms
from rais_jax.ghost.walker import MAX_UNROLL

__all__ = ["MAX_UNROLL", "value_grad_and_norms"]
