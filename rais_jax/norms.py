"""Per-example gradient norms u_k = ‖∇_w f_k(w)‖, exact or by proxy.

The interface shared by every exact method is
``per_example_grad_norms(loss_fn, params, batch) -> (m,)`` where
``loss_fn(params, batch)`` returns per-example losses of shape (m,) and every
leaf of ``batch`` has leading axis m. ``value_grad_and_norms`` also returns the
losses and the (weighted) summed gradient, so a training step that needs both
pays for one backward pass. Methods:

* ``"ghost"`` (default): the ghost-norm identity applied to the loss's jaxpr,
  see :mod:`rais_jax.ghost`: about the cost of one ordinary backward pass.
* ``"vmap"``: ``vmap`` of per-example ``grad``, the reference; memory grows as
  m × #params, and time up to m times a backward pass (on CPU; batched
  per-example gradients parallelise better on accelerators, and where ghost
  norms must vmap a whole ``scan`` — an RNN — vmap is the faster).
* ``"auto"``: the faster of the two for this loss at these shapes, measured
  by :func:`choose_method` when the function is traced (or called eagerly).

Both methods trace the loss one example at a time, so the loss must be
*separable*; every function here checks that at trace time
(:func:`rais_jax.separability.check_separable`).

The *proxy* of Johnson & Guestrin (2018) is the norm of the loss gradient with
respect to the model output: for softmax cross-entropy with logits z and label
y, ‖∂f/∂z‖ = ‖softmax(z) − e_y‖. It costs nothing beyond the forward pass but
is only proportional to the true norm, so the gain ratio must be estimated
scale-free with it (see :mod:`rais_jax.gain_ratio`).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Optional, cast

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rais_jax import ghost
from rais_jax import separability

PyTree = Any
LossFn = Callable[[PyTree, PyTree], chex.Array]

METHODS = ("ghost", "vmap", "auto")


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


def _value_grad_and_norms(loss_fn: LossFn, params: PyTree, batch: PyTree,
                          weights: chex.Array, method: str
                          ) -> tuple[chex.Array, PyTree, chex.Array]:
  """Both methods, unchecked (``method`` "ghost" or "vmap")."""
  if method == "ghost":
    return ghost.value_grad_and_norms(loss_fn, params, batch, weights)
  losses, backward = jax.vjp(lambda p: loss_fn(p, batch), params)
  (grads,) = backward(weights.astype(losses.dtype))
  return losses, grads, _vmap_norms(loss_fn, params, batch, None)


def choose_method(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                  repeats: int = 5, margin: float = 1.05) -> str:
  """The faster exact method for ``loss_fn`` at these shapes: "ghost" or "vmap".

  Measured: :func:`value_grad_and_norms` is compiled with each method for
  random inputs shaped like ``params`` and ``batch`` (arrays, tracers or
  ``jax.ShapeDtypeStruct``, so it also runs while an enclosing function is
  traced), run once to warm up, then ``repeats`` times round-robin on the
  default device; "vmap" is chosen if its median time is below ghost's
  divided by ``margin`` (near a tie ghost wins: its memory does not grow
  with m × #params); where the first calls already differ by 2× the faster
  is taken without the repeats. If vmap runs out of memory, ghost is the
  choice. Costs two compilations and 2 to 2 (``repeats`` + 1) calls.

  The choice can differ between processes where the two are within noise of
  each other, and the two methods' norms differ in round-off: for runs that
  must be bit-identical across processes (a resumed checkpoint), resolve it
  once and pass the name.
  """
  if repeats < 1 or margin < 1:
    raise ValueError(f"repeats must be ≥ 1 and margin ≥ 1; got {repeats}, {margin}.")
  m = check_loss_fn(loss_fn, params, batch)
  rng = np.random.default_rng(0)
  with jax.ensure_compile_time_eval():  # concrete, also inside a trace
    inputs = jax.device_put((*jax.tree.map(lambda x: separability.random_like(
        rng, x.shape, x.dtype), (params, batch)), np.full((m,), 1.0 / m, np.float32)))
  calls, first = {}, {}
  for method in ("ghost", "vmap"):
    # Compiled ahead of time and called on concrete inputs: not staged into
    # a trace that encloses this one.
    try:
      fn = jax.jit(functools.partial(_value_grad_and_norms, loss_fn,
                                     method=method)).lower(*inputs).compile()
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      first[method] = time.perf_counter() - start
    except (jax.errors.JaxRuntimeError, MemoryError):
      if method == "ghost":
        raise
      return "ghost"  # vmap's m × #params gradients did not fit
    calls[method] = fn
  # A factor of 2 in the first calls is no noise: skip the repeats (vmap of a
  # CNN on CPU can take 70× ghost's time per call).
  if max(first.values()) > 2 * min(first.values()):
    return min(first, key=first.__getitem__)
  times: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for method, fn in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*inputs))
      times[method].append(time.perf_counter() - start)
  ghost_t, vmap_t = (statistics.median(times[k]) for k in ("ghost", "vmap"))
  return "vmap" if vmap_t * margin < ghost_t else "ghost"


def _resolve(method: str, loss_fn: LossFn, params: PyTree, batch: PyTree) -> str:
  """A checked ``method`` by name, with "auto" measured."""
  return choose_method(loss_fn, params, batch) if method == "auto" else method


def per_example_grad_norms(loss_fn: LossFn, params: PyTree, batch: PyTree, *,
                           method: str = "ghost",
                           chunk_size: Optional[int] = None,
                           separable_check: bool = True) -> chex.Array:
  """Exact ‖∇_params f_k‖ for every example k of ``batch``, shape (m,).

  Args:
    loss_fn: ``(params, batch) -> (m,)`` per-example losses; each loss may
      depend only on its own example (no BatchNorm in training mode). It is
      traced for a batch of one example, so it must accept any batch size.
    params: the parameters to differentiate.
    batch: pytree whose leaves have leading axis m.
    method: ``"ghost"`` (one backward pass), ``"vmap"`` (the reference) or
      ``"auto"`` (:func:`choose_method`, measured at each trace).
    chunk_size: with ``"vmap"``, how many examples to differentiate at once.
    separable_check: probe ``loss_fn`` at trace time for losses that couple
      examples and refuse them (:func:`rais_jax.separability.check_separable`).

  Returns:
    Norms of shape (m,), float32.
  """
  _check_method(method)
  m = check_loss_fn(loss_fn, params, batch)
  if separable_check:
    separability.check_separable(loss_fn, params, batch)
  method = _resolve(method, loss_fn, params, batch)
  if method == "vmap":
    return _vmap_norms(loss_fn, params, batch, chunk_size)
  return ghost.value_grad_and_norms(loss_fn, params, batch,
                                    jnp.ones((m,), jnp.float32))[2]


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
  ``weights`` is 0. With ``"vmap"`` the norms cost a second, per-example
  pass; ``"auto"`` picks the faster of the two (:func:`choose_method`,
  measured at each trace). ``separable_check`` as for
  :func:`per_example_grad_norms`.
  """
  _check_method(method)
  m = check_loss_fn(loss_fn, params, batch)
  if weights is None:
    weights = jnp.full((m,), 1.0 / m, jnp.float32)
  elif jnp.shape(weights) != (m,):
    raise ValueError(f"weights must have shape (m,) = ({m},); got "
                     f"{jnp.shape(weights)}.")
  if separable_check:
    separability.check_separable(loss_fn, params, batch)
  return _value_grad_and_norms(loss_fn, params, batch, weights,
                               _resolve(method, loss_fn, params, batch))


def softmax_cross_entropy_proxy_norms(logits: chex.Array,
                                      labels: chex.Array) -> chex.Array:
  """‖softmax(z_k) − e_{y_k}‖, the gradient norm w.r.t. the logits, (m,)."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  delta = probs - jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return jnp.linalg.norm(delta, axis=-1)
