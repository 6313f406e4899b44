"""Orbax checkpoints of training: the train state and the Grain iterator, saved together.

Resume order: (1) build the abstract state and its shardings, (2) try the
newest step, restoring the state into those shardings and the iterator's
position, (3) if that step is unreadable (partial or corrupt), warn and try the
one before, (4) with none readable, start fresh. Randomness needs nothing
extra: iteration t draws from fold_in(state.rng, t).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every `every_steps` iterations (asynchronously), keeps `keep`."""

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep, create=True,
        enable_async_checkpointing=cfg.async_save)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "data"))

  def save(self, step: int, state: Any, data_iterator, force: bool = False) -> bool:
    """Save when the interval says so (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def restore(self, abstract_state: Any, data_iterator) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, the iterator moved to its
    position; None when there is none. `abstract_state`: ShapeDtypeStructs with shardings."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state, step
      except Exception as e:  # a partial or corrupt step: fall back to the previous one
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying the previous one",
                        step, self.manager.directory, type(e).__name__, str(e).splitlines()[0][:200])
        self._set_aside(step)
    return None

  def _set_aside(self, step: int) -> None:
    """Rename an unreadable step to `<step>.unreadable` so training can write that step again."""
    path = os.path.join(os.fspath(self.manager.directory), str(step))
    target = path + ".unreadable"
    if os.path.isdir(path) and not os.path.exists(target):
      os.rename(path, target)
      logging.warning("kept the unreadable checkpoint as %s", target)
    self.manager.reload()

  def restore_state(self, abstract_state: Any) -> tuple[Any, int]:
    """(state, step) of the newest readable checkpoint, without the data iterator (export)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored.state, step
      except Exception as e:  # as in `restore`
        logging.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                        step, self.manager.directory, type(e).__name__)
    raise FileNotFoundError(f"{self.manager.directory}: no readable checkpoint")

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract) carrying `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)
