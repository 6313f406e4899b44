"""Orbax checkpoints of training: the train state and the Grain iterator, saved together.

Resume order: (1) build the abstract state and its shardings, (2) read the newest
step's saved metadata and compare it with the abstract state, (3) restore the
state into those shardings, then the iterator's position, (4) if that step is
corrupt or partial, warn and try the one before, (5) with none readable, start
fresh. Randomness needs nothing extra: iteration t draws from fold_in(state.rng, t).

How a step that cannot be restored is judged (the first rule that applies):

1. Mismatch: the step's saved metadata of the `state` item (tree paths, shapes,
   dtypes) differs from the abstract state the config builds, or the Grain
   iterator refuses a saved position that decodes. Raises `CheckpointMismatch` (a
   ValueError) naming the step's folder and the first differing paths, saved vs
   expected. The metadata is compared before any array is read.
2. I/O failure: the storage failed to deliver bytes. Any of: an OSError other
   than "no such file" (FileNotFoundError, NotADirectoryError,
   IsADirectoryError) in the error's cause chain; a TensorStore error (a
   ValueError whose message starts with an absl status code) whose status is
   a storage one (PERMISSION_DENIED, UNAVAILABLE, RESOURCE_EXHAUSTED,
   DEADLINE_EXCEEDED, ABORTED, CANCELLED, UNAUTHENTICATED, INTERNAL, UNKNOWN)
   or which carries an `os_error_code` other than ENOENT; or, for an error
   that looks like bad data, re-reading every file of the step hits an
   OSError. Raises `CheckpointIOError` (an OSError) naming the step's folder.
3. Corrupt or partial: the data explains the error and every file of the step
   reads: a missing file or item (FileNotFoundError, KeyError, TensorStore
   NOT_FOUND, no file of the data iterator's position), undecodable metadata
   (a ValueError such as a JSON error, or no metadata of the state item),
   truncated or undecodable arrays (TensorStore DATA_LOSS, OUT_OF_RANGE,
   FAILED_PRECONDITION, INVALID_ARGUMENT) or position. Warns in
   one line and tries the previous step; `restore` (training) renames the step
   `<step>.unreadable` so training can write that step again, `restore_state`
   (export) leaves it in place.
4. Anything else (out of memory, an interrupted run) propagates unchanged.

Rules 1, 2 and 4 leave the checkpoint folder as it was and close the manager. A
failed orbax restore leaves TensorStore reads in flight on a closed event loop;
`_AbandonedReads` keeps their hundreds of asyncio tracebacks out of the log.
"""
from __future__ import annotations

import errno
import gc
import inspect
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

MAX_LISTED = 4  # mismatching paths named in a CheckpointMismatch message

_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_STORAGE_STATUS = frozenset({"PERMISSION_DENIED", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
                             "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "UNAUTHENTICATED",
                             "INTERNAL", "UNKNOWN"})
_STATUS = re.compile(r"^([A-Z_]+): ")
_OS_ERROR_CODE = re.compile(r"\[os_error_code='(\d+)'\]")
_PROBE_CHUNK = 1 << 24


class CheckpointMismatch(ValueError):
  """A checkpoint step does not fit the config (tree, shapes, dtypes, data pipeline)."""


class CheckpointIOError(OSError):
  """The storage failed while reading a checkpoint step."""


class _Unreadable(Exception):
  """Internal: a corrupt or partial step (rule 3); the message says what is wrong."""


class Checkpointer:
  """Saves every `every_steps` iterations (asynchronously), keeps `keep`."""

  def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=cfg.every_steps, max_to_keep=cfg.keep, create=True,
        enable_async_checkpointing=cfg.async_save)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.handlers.StandardCheckpointHandler()
    data_handler = grain.checkpoint.CheckpointHandler()
    registry.add("state", ocp.args.StandardSave, state_handler)
    registry.add("state", ocp.args.StandardRestore, state_handler)
    registry.add("data", grain.checkpoint.CheckpointSave, data_handler)
    registry.add("data", grain.checkpoint.CheckpointRestore, data_handler)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         handler_registry=registry)
    self._closed = False

  def save(self, step: int, state: Any, data_iterator, force: bool = False) -> bool:
    """Save when the interval says so (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def restore(self, abstract_state: Any, data_iterator) -> tuple[Any, int] | None:
    """(state, step) of the newest readable checkpoint, the iterator moved to its
    position; None when there is none. `abstract_state`: ShapeDtypeStructs with
    shardings. Raises CheckpointMismatch / CheckpointIOError (see the module doc)."""
    return self._newest(abstract_state, data_iterator, set_aside=True)

  def restore_state(self, abstract_state: Any) -> tuple[Any, int]:
    """(state, step) of the newest readable checkpoint, without the data iterator
    (export); corrupt steps are skipped but left in place."""
    restored = self._newest(abstract_state, None, set_aside=False)
    if restored is None:
      raise FileNotFoundError(f"{self.manager.directory}: no readable checkpoint")
    return restored

  def _newest(self, abstract_state, data_iterator, set_aside: bool):
    try:
      for step in sorted(self.manager.all_steps(), reverse=True):
        try:
          return self._restore_step(step, abstract_state, data_iterator), step
        except _Unreadable as e:
          logging.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                          step, self.manager.directory, e)
          if set_aside:
            self._set_aside(step)
      return None
    except BaseException:
      self.close()  # the run stops: leave no pending work or open event loops behind
      raise

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.manager.directory) / str(step)

  def _restore_step(self, step: int, abstract_state: Any, data_iterator) -> Any:
    try:
      metadata = self.manager.metadata(step).item_metadata
    except Exception as e:
      self._judge(step, "reading its metadata", e)
      raise
    saved = metadata.get("state") if metadata is not None else None
    if saved is None:
      self._probe(step, "reading its metadata")
      raise _Unreadable("reading its metadata: no metadata of the state item")
    mismatches = compare(saved, abstract_state)
    if mismatches:
      shown = "; ".join(mismatches[:MAX_LISTED])
      more = f" (and {len(mismatches) - MAX_LISTED} more)" if len(mismatches) > MAX_LISTED else ""
      raise CheckpointMismatch(
          f"checkpoint {self._step_dir(step)} does not match the config: {len(mismatches)} "
          f"arrays differ, saved vs expected: {shown}{more}; resume with the config it was "
          f"saved with, or use a new workdir")
    with _AbandonedReads() as abandoned:
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
      except Exception as e:
        for c in _chain(e):  # drop the failed restore's locals: its event loop and tasks
          traceback.clear_frames(c.__traceback__)
        abandoned.settle()
        self._judge(step, "restoring its arrays", e)
        raise
    if data_iterator is not None:
      self._restore_data(step, data_iterator)
    return state

  def _restore_data(self, step: int, data_iterator) -> None:
    """Move the iterator to the step's saved position: a missing or undecodable
    position is corrupt; one the iterator refuses is a mismatch."""
    doing = "restoring the data iterator's position"
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:
      _raise_if_storage(self._step_dir(step), doing, e)
      self._probe(step, doing)
      undecodable = any(isinstance(c, (json.JSONDecodeError,) + _MISSING) for c in _chain(e))
      if undecodable or not any(self._files(step, doing, "data")):
        raise _Unreadable(f"{doing}: {_describe(e)}") from e
      raise CheckpointMismatch(
          f"checkpoint {self._step_dir(step)}: the data iterator's saved position does not "
          f"fit the current data pipeline ({_describe(e)}); resume with the data settings "
          f"it was saved with, or use a new workdir") from e

  def _judge(self, step: int, doing: str, error: Exception) -> None:
    """For `error` met while `doing` on `step`: raise CheckpointIOError (module doc
    rule 2) or _Unreadable (rule 3); return to let the caller re-raise `error` (rule 4)."""
    _raise_if_storage(self._step_dir(step), doing, error)
    self._probe(step, doing)
    data_errors = (ValueError, KeyError, EOFError) + _MISSING
    if any(isinstance(c, data_errors) for c in _chain(error)):
      raise _Unreadable(f"{doing}: {_describe(error)}") from error

  def _probe(self, step: int, doing: str) -> None:
    """Read every file of the step; CheckpointIOError if the storage fails."""
    for path in self._files(step, doing):
      try:
        with path.open("rb") as f:
          while f.read(_PROBE_CHUNK):
            pass
      except _MISSING:
        continue
      except OSError as e:
        raise self._io_error(step, doing, f"cannot read {path}: {e.strerror or e}") from e

  def _files(self, step: int, doing: str, item: str = "") -> list[epath.Path]:
    """The files of the step (of one item of it); none when the folder is missing."""
    folder = self._step_dir(step) / item if item else self._step_dir(step)
    out, folders = [], [folder]
    while folders:
      current = folders.pop()
      try:
        for path in current.iterdir():
          (folders if path.is_dir() else out).append(path)
      except _MISSING:
        continue
      except OSError as e:
        raise self._io_error(step, doing, f"cannot list {current}: {e.strerror or e}") from e
    return sorted(out)

  def _io_error(self, step: int, doing: str, what: str) -> CheckpointIOError:
    return CheckpointIOError(f"checkpoint {self._step_dir(step)}: I/O error while {doing}: "
                             f"{what}; nothing was changed, fix the storage and run again")

  def _set_aside(self, step: int) -> None:
    """Rename a corrupt step to `<step>.unreadable` (`.unreadable.2`, ... when taken) so
    training can write that step again; process 0 renames, every process reloads."""
    path = os.fspath(self._step_dir(step))
    if jax.process_index() == 0 and os.path.isdir(path):
      target, n = path + ".unreadable", 1
      while os.path.exists(target):
        n += 1
        target = f"{path}.unreadable.{n}"
      os.rename(path, target)
      logging.warning("kept the unreadable checkpoint as %s", target)
    self.manager.reload()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self.manager.close()


class _AbandonedReads(logging.Filter):
  """While restoring: when orbax's restore fails, it closes its event loop with array
  reads still in flight; TensorStore completes them later and Python reports each one
  (an unraisable 'Event loop is closed' error, an abandoned coroutine, or asyncio's
  'exception was never retrieved' log record): hundreds of tracebacks. Inside this
  context those reports are dropped; `settle` waits until they stop arriving. Every
  other report goes where it went before."""

  def __enter__(self):
    self._previous = sys.unraisablehook
    self._last = time.monotonic()
    sys.unraisablehook = self._hook
    logging.getLogger("asyncio").addFilter(self)
    return self

  def _hook(self, report) -> None:
    error = report.exc_value
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        or inspect.iscoroutine(report.object)):
      self._last = time.monotonic()
      return
    self._previous(report)

  def filter(self, record: logging.LogRecord) -> bool:
    if "exception was never retrieved" in str(record.msg).split("\n", 1)[0]:
      self._last = time.monotonic()
      return False
    return True

  def settle(self, quiet_s: float = 1.0, limit_s: float = 30.0) -> None:
    """Wait (at most limit_s) until no abandoned read has reported for quiet_s."""
    self._last = time.monotonic()
    deadline = self._last + limit_s
    while time.monotonic() < deadline:
      gc.collect()  # finalizes abandoned tasks and coroutines now, inside this context
      if time.monotonic() - self._last >= quiet_s:
        return
      time.sleep(0.05)

  def __exit__(self, *exc) -> None:
    logging.getLogger("asyncio").removeFilter(self)
    sys.unraisablehook = self._previous


def compare(saved: Any, abstract: Any) -> list[str]:
  """Differences between a step's saved tree metadata and an abstract state:
  'path: saved SHAPE DTYPE, expected SHAPE DTYPE' (or 'not saved' / 'not in the
  config'), parameters before optimizer state, each group by path. Empty nodes
  (optimizer states without arrays) are not compared."""
  want = _leaves(ocp.tree.serialize_tree(abstract, keep_empty_nodes=True))
  have = _leaves(saved)
  out = []
  for key in sorted(set(want) | set(have), key=lambda k: ("opt_state" in k, k)):
    if key not in have:
      out.append(f"{key}: not saved, expected {_spec(want[key])}")
    elif key not in want:
      out.append(f"{key}: saved {_spec(have[key])}, not in the config")
    elif _spec(have[key]) != _spec(want[key]):
      out.append(f"{key}: saved {_spec(have[key])}, expected {_spec(want[key])}")
  return out


def _leaves(tree: Any) -> dict[str, Any]:
  flat = ocp.tree.to_flat_dict(tree, sep=".")
  return {k: v for k, v in flat.items() if not (v is None or (isinstance(v, (dict, list, tuple))
                                                                and not v))}


def _spec(leaf: Any) -> str:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None and dtype is None:
    return type(leaf).__name__
  return f"{tuple(shape) if shape is not None else '?'} {dtype if dtype is not None else '?'}"


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes (and unsuppressed contexts), outermost first, as a
  traceback shows them."""
  out, seen = [], set()
  while error is not None and id(error) not in seen:
    out.append(error)
    seen.add(id(error))
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return out


def _raise_if_storage(where: epath.Path, doing: str, error: Exception) -> None:
  """CheckpointIOError when `error` says the storage failed (module doc rule 2)."""
  for c in _chain(error):
    storage = isinstance(c, OSError) and not isinstance(c, _MISSING)
    if isinstance(c, ValueError):
      message = str(c)
      status = _STATUS.match(message)
      code = _OS_ERROR_CODE.search(message)
      storage = bool(status and status.group(1) in _STORAGE_STATUS) or bool(
          code and int(code.group(1)) != errno.ENOENT)
    if storage:
      raise CheckpointIOError(
          f"checkpoint {where}: I/O error while {doing}: {_describe(c)}; nothing was "
          f"changed, fix the storage and run again") from error


def _describe(error: BaseException) -> str:
  """The first line of the innermost cause of `error` (TensorStore's own message, not
  orbax's wrapper), with its type."""
  error = _chain(error)[-1]
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0].split(" [tensorstore_spec=")[0][:300] if lines else ""
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or abstract) carrying `shardings`."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)
