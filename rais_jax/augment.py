"""Per-example data augmentation on device: pure, jittable, one key per example.

An augmentation is ``augment(key, example) -> example`` on one example (a
pytree without the batch axis). Pass it to :func:`rais_jax.make_runner` or
:func:`rais_jax.make_train_step` (``augment=``): every step applies it to each
gathered (or loaded) example with that example's own key (:func:`batch`).
The sampler still indexes the original examples; see :mod:`rais_jax.model`
for what it then learns and why the gradient stays unbiased.

The two image training uses: :func:`random_crop` (pad, then crop back at a
random offset) and :func:`horizontal_flip`. Images are (H, W) or (H, W, C).
A flip suits natural images and clothing (Fashion-MNIST: a shoe mirrored is
a shoe); not digits or text.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

PyTree = Any
Augment = Callable[[chex.PRNGKey, PyTree], PyTree]


def _check_image(x: chex.Array) -> None:
  if x.ndim not in (2, 3):
    raise ValueError(f"image augmentations take one example shaped (H, W) or "
                     f"(H, W, C); got shape {x.shape}.")


def random_crop(padding: int, *, input_key: str = "x") -> Augment:
  """Zero-pads ``example[input_key]`` by ``padding`` on each side of H and W
  and crops it back to (H, W) at an offset uniform in [0, 2·padding]²."""
  if padding < 0:
    raise ValueError(f"padding must be ≥ 0; got {padding}.")

  def augment(key: chex.PRNGKey, example: PyTree) -> PyTree:
    x = example[input_key]
    _check_image(x)
    pads = [(padding, padding)] * 2 + [(0, 0)] * (x.ndim - 2)
    offsets = jax.random.randint(key, (2,), 0, 2 * padding + 1)
    start = (offsets[0], offsets[1]) + (0,) * (x.ndim - 2)
    crop = jax.lax.dynamic_slice(jnp.pad(x, pads), start, x.shape)
    return {**example, input_key: crop}

  return augment


def horizontal_flip(*, input_key: str = "x") -> Augment:
  """Mirrors ``example[input_key]`` along W with probability 1/2."""

  def augment(key: chex.PRNGKey, example: PyTree) -> PyTree:
    x = example[input_key]
    _check_image(x)
    flip = jax.random.bernoulli(key)
    return {**example, input_key: jnp.where(flip, x[:, ::-1], x)}

  return augment


def chain(*augments: Augment) -> Augment:
  """The augmentations one after the other, each with its own key."""

  def augment(key: chex.PRNGKey, example: PyTree) -> PyTree:
    for i, fn in enumerate(augments):
      example = fn(jax.random.fold_in(key, i), example)
    return example

  return augment


def batch(augment: Augment, key: chex.PRNGKey, examples: PyTree) -> PyTree:
  """``augment`` applied to each example of ``examples`` (leading axis m),
  example k with ``fold_in(key, k)``."""
  m = jax.tree.leaves(examples)[0].shape[0]
  keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(m))
  return jax.vmap(augment)(keys, examples)
