"""Per-example gradient norms u_k = ‖∇_w f_k(w)‖, exact or by proxy.

The interface shared by every exact method is
``per_example_grad_norms(loss_fn, params, batch) -> (m,)`` where
``loss_fn(params, batch)`` returns per-example losses of shape (m,) and every
leaf of ``batch`` has leading axis m. ``value_grad_and_norms`` also returns the
losses and the (weighted) summed gradient, so a training step that needs both
pays for one backward pass. Methods:

* ``"ghost"`` (default): the ghost-norm identity applied to the loss's jaxpr,
  see :mod:`rais_jax.ghost`: about the cost of one ordinary backward pass.
* ``"vmap"``: ``vmap`` of per-example ``grad``, the reference; about m times
  the cost, and memory grows as m × #params.

The *proxy* of Johnson & Guestrin (2018) is the norm of the loss gradient with
respect to the model output: for softmax cross-entropy with logits z and label
y, ‖∂f/∂z‖ = ‖softmax(z) − e_y‖. It costs nothing beyond the forward pass but
is only proportional to the true norm, so the gain ratio must be estimated
scale-free with it (see :mod:`rais_jax.gain_ratio`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, cast

import chex
import jax
import jax.numpy as jnp
import optax

from rais_jax import ghost

PyTree = Any
LossFn = Callable[[PyTree, PyTree], chex.Array]

METHODS = ("ghost", "vmap")


def batch_size_of(batch: PyTree) -> int:
  """The common leading axis m of a batch pytree, with a clear error if none."""
  sizes = {leaf.shape[0] if getattr(leaf, "ndim", 0) else None
           for leaf in jax.tree.leaves(batch)}
  if not sizes:
    raise ValueError("batch is empty: it must be a pytree of arrays with "
                     "leading axis m.")
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        "every leaf of batch must be an array with the same leading (example) "
        f"axis; found leading sizes {sorted(s for s in sizes if s is not None)}"
        f"{' and scalars' if None in sizes else ''}.")
  # Not int(): the size may be a symbolic dimension (shape polymorphism).
  return cast(int, sizes.pop())  # None was refused above


def check_loss_fn(loss_fn: LossFn, params: PyTree, batch: PyTree) -> int:
  """Checks ``loss_fn(params, batch)`` has shape (m,) without running it."""
  m = batch_size_of(batch)
  try:
    out = jax.eval_shape(loss_fn, params, batch)
  except (jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError,
          jax.errors.TracerIntegerConversionError) as e:
    raise ValueError(
        "loss_fn cannot be traced by JAX (it must be jit-able): it uses the "
        "value of a traced array in Python (an `if`, `float()`, `.item()`, "
        "NumPy call, ...). Use jnp.where / lax.cond and jnp functions. JAX "
        f"said: {str(e).splitlines()[0]}") from e
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != (m,):
    raise ValueError(
        "loss_fn(params, batch) must return per-example losses of shape "
        f"(m,) = ({m},); it returned {jax.tree.map(lambda x: x.shape, out)}. "
        "Return the unreduced losses, not their mean.")
  return m


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")


def _vmap_norms(loss_fn: LossFn, params: PyTree, batch: PyTree,
                chunk_size: Optional[int]) -> chex.Array:
  def one(example):
    single = jax.tree.map(lambda x: x[None], example)
    grads = jax.grad(lambda p: loss_fn(p, single)[0])(params)
    return optax.tree.norm(grads)

  if chunk_size is None:
    return jax.vmap(one)(batch)
  return jax.lax.map(one, batch, batch_size=chunk_size)


def per_example_grad_norms(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                           method: str = "ghost",
                           chunk_size: Optional[int] = None,
                           separable_check: bool = True) -> chex.Array:
  """Exact ‖∇_params f_k‖ for every example k of ``batch``, shape (m,).

  Args:
    loss_fn: ``(params, batch) -> (m,)`` per-example losses; each loss may
      depend only on its own example (no BatchNorm in training mode). With
      ``"ghost"`` it is traced for a batch of one example, so it must accept
      any batch size.
    params: the parameters to differentiate.
    batch: pytree whose leaves have leading axis m.
    method: ``"ghost"`` (one backward pass) or ``"vmap"`` (the reference).
    chunk_size: with ``"vmap"``, how many examples to differentiate at once.
    separable_check: with ``"ghost"``, probe ``loss_fn`` at trace time for
      losses that couple examples and refuse them (see
      :func:`rais_jax.ghost.check_separable`).

  Returns:
    Norms of shape (m,), float32.
  """
  _check_method(method)
  m = check_loss_fn(loss_fn, params, batch)
  if method == "vmap":
    return _vmap_norms(loss_fn, params, batch, chunk_size)
  return ghost.value_grad_and_norms(
      loss_fn, params, batch, jnp.ones((m,), jnp.float32),
      separable_check=separable_check)[2]


def value_grad_and_norms(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                         weights: Optional[chex.Array] = None,
                         method: str = "ghost",
                         separable_check: bool = True
                         ) -> tuple[chex.Array, PyTree, chex.Array]:
  """Per-example losses, the weighted gradient and exact per-example norms.

  Returns ``(losses, grads, norms)``: ``losses = loss_fn(params, batch)``,
  ``grads = ∇_params Σ_k weights_k f_k`` (``weights`` defaults to 1/m, the
  mean) and ``norms[k] = ‖∇_params f_k‖`` (unweighted). With ``"ghost"`` all
  three come from one forward and one backward pass; the norms are recovered
  from the weighted pass as ‖∇(w_k f_k)‖ / ``|w_k|``, so they are NaN where
  ``weights`` is 0. With ``"vmap"`` the norms cost a second, per-example pass.
  """
  _check_method(method)
  m = check_loss_fn(loss_fn, params, batch)
  if weights is None:
    weights = jnp.full((m,), 1.0 / m, jnp.float32)
  elif jnp.shape(weights) != (m,):
    raise ValueError(f"weights must have shape (m,) = ({m},); got "
                     f"{jnp.shape(weights)}.")
  if method == "ghost":
    return ghost.value_grad_and_norms(loss_fn, params, batch, weights,
                                      separable_check=separable_check)
  losses, backward = jax.vjp(lambda p: loss_fn(p, batch), params)
  (grads,) = backward(weights.astype(losses.dtype))
  return losses, grads, _vmap_norms(loss_fn, params, batch, None)


def softmax_cross_entropy_proxy_norms(logits: chex.Array,
                                      labels: chex.Array) -> chex.Array:
  """‖softmax(z_k) − e_{y_k}‖, the gradient norm w.r.t. the logits, (m,)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  delta = probs - jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return jnp.linalg.norm(delta, axis=-1)
