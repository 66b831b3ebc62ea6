"""Frozen dataclasses registered as JAX pytrees: rais-jax's state containers.

The API of ``flax.struct`` (``dataclass``, ``field(pytree_node=False)``,
``PyTreeNode.replace``) from JAX alone (``jax.tree_util.register_dataclass``), so that
the core library does not depend on flax (and, through it, on orbax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax
from typing_extensions import dataclass_transform

T = TypeVar("T")


class PyTreeNode:
  """Base of the state dataclasses, for ``replace`` (and its type)."""

  def replace(self: T, **changes: Any) -> T:
    """A copy with ``changes`` to its fields."""
    return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def field(*, pytree_node: bool = True, **kwargs: Any) -> Any:
  """A dataclass field; ``pytree_node=False`` makes it static metadata."""
  metadata = {**kwargs.pop("metadata", {}), "static": not pytree_node}
  return dataclasses.field(metadata=metadata, **kwargs)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def dataclass(cls: type[T]) -> type[T]:
  """A frozen dataclass whose fields are pytree children (except those made
  with ``field(pytree_node=False)``); subclass :class:`PyTreeNode` for
  ``replace(**changes)``."""
  return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))

