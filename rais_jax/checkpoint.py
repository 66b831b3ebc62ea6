"""Checkpoints of a RAIS training state (orbax), refused when they do not match.

A checkpoint directory holds the state pytree (``state/``, written by orbax's
``StandardCheckpointer``: params, optimizer state and the whole sampler state,
including a (PT) solve in flight, which the sampler re-solves on restore) and
``rais_jax.json``, what the state was built for: the format version, n and the
sampler's feature names. :func:`restore` compares that with the sampler it is
given and refuses a mismatch with one clear error, instead of resuming a run
on features that mean something else.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax

try:
  import orbax.checkpoint as ocp
except ImportError as e:  # the core installs without orbax
  raise ImportError(
      "rais_jax.checkpoint needs orbax-checkpoint: install the extra with pip "
      "install \"rais-jax[checkpoint]\" (from a checkout: pip install -e "
      "\".[checkpoint]\").") from e

from rais_jax.sampler import Sampler

# 2: TrainState gained ``skipped_steps``. 3: one TrainState for both drivers
# (the gain-ratio moments and the step count moved out of the sampler state).
# 4: TrainState gained ``model_state``.
FORMAT_VERSION = 4
METADATA = "rais_jax.json"


def _metadata(sampler: Sampler) -> dict[str, Any]:
  return {"format_version": FORMAT_VERSION,
          "num_examples": int(sampler.num_examples),
          "feature_names": list(sampler.feature_names)}


def save(directory: os.PathLike | str, state: Any, sampler: Sampler) -> None:
  """Writes ``state`` (e.g. a :class:`rais_jax.TrainState`) and its metadata.

  ``directory`` must not exist yet (orbax does not overwrite).
  """
  directory = pathlib.Path(directory).absolute()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "state", state)
  (directory / METADATA).write_text(json.dumps(_metadata(sampler), indent=1))


def restore(directory: os.PathLike | str, like: Any, sampler: Sampler) -> Any:
  """Reads a checkpoint written by :func:`save` into the structure of ``like``.

  Raises ``ValueError`` if it was written for another number of examples,
  other features, another format version, or a state of another structure.
  """
  directory = pathlib.Path(directory).absolute()
  path = directory / METADATA
  if not path.is_file():
    raise ValueError(f"{directory} is not a rais_jax checkpoint: it has no "
                     f"{METADATA}. Write checkpoints with rais_jax.checkpoint.save.")
  saved = json.loads(path.read_text())
  expected = _metadata(sampler)
  if saved.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"checkpoint {directory} has format version "
        f"{saved.get('format_version')}; this rais_jax reads version "
        f"{FORMAT_VERSION}. Restore it with the rais_jax version that wrote it.")
  if saved["num_examples"] != expected["num_examples"]:
    raise ValueError(
        f"checkpoint {directory} was written for n = {saved['num_examples']} "
        f"examples; this sampler has n = {expected['num_examples']}. Restore "
        "with a sampler over the same training set.")
  if saved["feature_names"] != expected["feature_names"]:
    raise ValueError(
        f"checkpoint {directory} was written for features "
        f"{saved['feature_names']}; this sampler has "
        f"{expected['feature_names']}. Restore with the same feature map.")
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(directory / "state", target)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {directory} does not match the structure or shapes of "
          f"the state to restore into (a different model, optimizer or "
          f"sampler configuration?): {e}") from None
