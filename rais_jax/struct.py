"""Frozen dataclasses registered as JAX pytrees: rais-jax's state containers.

The API of ``flax.struct`` (``dataclass``, ``field(pytree_node=False)``,
``.replace``) from JAX alone (``jax.tree_util.register_dataclass``), so that
the core library does not depend on flax (and, through it, on orbax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")


def _replace(self: T, **changes: Any) -> T:
  return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def dataclass(cls: type[T]) -> type[T]:
  """A frozen dataclass whose fields are pytree children (except those made
  with ``field(pytree_node=False)``), with ``replace(**changes)``."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  cls.replace = _replace  # type: ignore[attr-defined]
  return jax.tree_util.register_dataclass(cls)


def field(*, pytree_node: bool = True, **kwargs: Any) -> Any:
  """A dataclass field; ``pytree_node=False`` makes it static metadata."""
  metadata = {**kwargs.pop("metadata", {}), "static": not pytree_node}
  return dataclasses.field(metadata=metadata, **kwargs)
