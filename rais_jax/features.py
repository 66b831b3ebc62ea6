"""Per-example features s_i ≥ 0 that parametrise the uncertainty set.

A :class:`FeatureMap` is a small bundle of pure functions over a per-example
state pytree (leading axis n), in the style of an optax transformation:

* ``init()`` → state;
* ``compute(state, indices)`` → (len(indices), d_R) non-negative features, or
  (n, d_R) for all examples when ``indices`` is None;
* ``update(state, indices, norms, valid)`` → state after the examples at
  ``indices`` were measured with gradient norms ``norms`` (entries where
  ``valid`` is False must be ignored).

Features may only change for the examples just measured (that is what keeps the
sum-tree update O(m log n)). A feature that would change for every example at
every step, such as "steps since last seen", must not be modelled here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from rais_jax import scatter, struct

PyTree = Any


class FeatureMap(NamedTuple):
  """Pure functions computing and updating per-example features."""

  num_examples: int
  names: Sequence[str]
  init: Callable[[], PyTree]
  compute: Callable[[PyTree, Optional[chex.Array]], chex.Array]
  update: Callable[[PyTree, chex.Array, chex.Array, chex.Array], PyTree]

  @property
  def num_features(self) -> int:
    return len(self.names)


@struct.dataclass
class DefaultFeatureState(struct.PyTreeNode):
  labels: chex.Array  # (n,) int32 class labels
  last_norm: chex.Array  # (n,) float32, 0 until first measured
  seen: chex.Array  # (n,) bool


def default_features(labels: chex.Array, num_classes: int) -> FeatureMap:
  """The default features of Johnson & Guestrin (2018): [1, one_hot(y_i),
  last norm of i, never sampled].

  d_R = num_classes + 3. The last measured norm is 0 until example i is
  sampled; the flag is 1 until then.

  Args:
    labels: (n,) integer class labels in [0, num_classes).
    num_classes: K.
  """
  labels_np = np.asarray(labels)
  if labels_np.ndim != 1 or labels_np.shape[0] == 0:
    raise ValueError(
        f"labels must be a non-empty 1-D array of class ids; got shape "
        f"{labels_np.shape}.")
  if not np.issubdtype(labels_np.dtype, np.integer):
    raise ValueError(f"labels must be integers; got dtype {labels_np.dtype}.")
  if num_classes < 1 or labels_np.min() < 0 or labels_np.max() >= num_classes:
    raise ValueError(
        f"labels must lie in [0, num_classes={num_classes}); found range "
        f"[{labels_np.min()}, {labels_np.max()}].")
  n = labels_np.shape[0]
  names = (["constant"] + [f"class {k}" for k in range(num_classes)]
           + ["last norm", "never sampled"])

  def init() -> DefaultFeatureState:
    return DefaultFeatureState(
        labels=jnp.asarray(labels_np, jnp.int32),
        last_norm=jnp.zeros((n,), jnp.float32),
        seen=jnp.zeros((n,), bool))

  def compute(state: DefaultFeatureState,
              indices: Optional[chex.Array] = None) -> chex.Array:
    take = (lambda x: x) if indices is None else (lambda x: x[indices])
    labels_, last, seen = take(state.labels), take(state.last_norm), take(state.seen)
    return jnp.concatenate([
        jnp.ones(labels_.shape + (1,), jnp.float32),
        jax.nn.one_hot(labels_, num_classes, dtype=jnp.float32),
        last[..., None],
        (~seen)[..., None].astype(jnp.float32),
    ], axis=-1)

  def update(state: DefaultFeatureState, indices: chex.Array,
             norms: chex.Array, valid: chex.Array) -> DefaultFeatureState:
    # An example drawn twice keeps its last valid norm (on every backend).
    writes = scatter.last_valid(indices, valid, n)
    return state.replace(
        last_norm=state.last_norm.at[writes].set(norms.astype(jnp.float32),
                                                  mode="drop"),
        seen=state.seen.at[writes].set(True, mode="drop"))

  return FeatureMap(num_examples=n, names=tuple(names), init=init,
                    compute=compute, update=update)


def static_features(features: chex.Array,
                    names: Optional[Sequence[str]] = None) -> FeatureMap:
  """Fixed user-supplied features (n, d_R) ≥ 0 that never change."""
  f = np.asarray(features, np.float32)
  if f.ndim != 2 or f.shape[0] == 0 or f.shape[1] == 0:
    raise ValueError(f"features must have shape (n, d_R) with n, d_R ≥ 1; got {f.shape}.")
  if not np.all(np.isfinite(f)) or np.any(f < 0):
    raise ValueError("features must be finite and non-negative.")
  names = tuple(names) if names is not None else tuple(f"f{j}" for j in range(f.shape[1]))
  if len(names) != f.shape[1]:
    raise ValueError(f"got {len(names)} names for {f.shape[1]} features.")

  def compute(state, indices=None):
    return state if indices is None else state[indices]

  return FeatureMap(
      num_examples=f.shape[0], names=names, init=lambda: jnp.asarray(f),
      compute=compute, update=lambda state, indices, norms, valid: state)


def one_value(state: chex.Array, idx: Optional[chex.Array] = None) -> chex.Array:
  """A one-feature map's ``compute``: the state's value of each example (of
  ``idx``), as a column."""
  return (state if idx is None else state[idx])[..., None]


def unchanged(state: PyTree, idx: chex.Array, values: chex.Array,
              valid: chex.Array) -> PyTree:
  """An ``update`` for features that measurements do not change."""
  del idx, values, valid
  return state
