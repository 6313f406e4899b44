"""Resuming never throws progress away: a corrupt or partial newest step falls back to the
previous one with a one-line warning; a step that does not fit the config, a change of
`model` settings, or an I/O error stops with one line and leaves the files as they were.

One workdir per module holds the tiny config's checkpoints of steps 1 and 2 (written by
the library, without compiling a train step) and is copied for each case. The cases that
stop before compiling run `cli.main` in this process; the end-to-end `g2face train`
fallback runs in a subprocess and is marked slow.
"""
import errno
import hashlib
import os
import shutil
import subprocess
import sys

import jax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from g2face_jax import cli
from g2face_jax import config as config_lib
from g2face_jax.datasets import pipeline, sources
from g2face_jax.train import checkpoint as checkpoint_lib
from g2face_jax.train import export
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import runtime

CONFIG = ("tiny,train.num_steps={n},checkpoint.every_steps=1,checkpoint.async_save=false,"
          "log.sample_every_steps=0,log.samples=1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_train(workdir, cache, spec):
  done = subprocess.run(
      [sys.executable, "-m", "g2face_jax.cli", "train", "--config", spec, "--workdir",
       str(workdir), "--compile-cache", str(cache)],
      cwd=ROOT, capture_output=True, text=True, timeout=1800)
  return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir as `g2face train --config CONFIG` leaves it after 2 steps, checkpointing
  both (the initial state saved as steps 1 and 2: what is saved matters here, not how
  well it trained)."""
  workdir = tmp_path_factory.mktemp("resume") / "w"
  export.save_config_spec(str(workdir), CONFIG.format(n=2))
  config = config_lib.load(CONFIG.format(n=2))
  rt, iterator = _runtime_and_iterator(config)
  state = runtime.init_state(rt, jax.random.key(config.train.seed))
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
  try:
    for step in (1, 2):
      next(iterator)
      checkpointer.save(step, state.replace(step=state.step + step), iterator, force=True)
    checkpointer.wait()
  finally:
    checkpointer.close()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  path = tmp_path / "w"
  shutil.copytree(trained, path)
  return path


def _snapshot(folder):
  """{relative path: sha256 (files) or 'dir'} of everything under folder."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder)] = "dir"
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _array_files(step_dir):
  return sorted((step_dir / "state").glob("ocdbt.process_*/d/*"))


def _cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def _one_error_line(err, command):
  lines = [line for line in err.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(f"g2face {command}: error: ")]
  assert len(errors) == 1, err
  assert "Traceback" not in err and "Event loop is closed" not in err, err
  return errors[0]


@pytest.mark.slow
def test_truncated_newest_step_falls_back_and_is_kept(workdir, tmp_path):
  """`g2face train` end to end (compiles the train step: minutes on 2 cores)."""
  step2 = workdir / "checkpoints" / "2"
  biggest = max(_array_files(step2), key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)
  corrupt = _snapshot(step2)

  code, out, err = _subprocess_train(workdir, tmp_path / "xla", CONFIG.format(n=2))
  assert code == 0, err[-3000:]
  assert "resumed from the checkpoint of step 1" in out
  warnings = [line for line in err.splitlines() if "is unreadable" in line]
  assert len(warnings) == 1 and "checkpoint step 2 in" in warnings[0], err[-3000:]
  assert "OUT_OF_RANGE" in warnings[0] or "DATA_LOSS" in warnings[0], warnings[0]
  assert "Traceback" not in err and "Event loop is closed" not in err, err[-3000:]
  # the corrupt step is set aside as it was, and training wrote step 2 again
  assert _snapshot(workdir / "checkpoints" / "2.unreadable") == corrupt
  assert "2" in os.listdir(workdir / "checkpoints")


@pytest.mark.parametrize("missing", ["array files", "tree metadata"])
def test_missing_files_fall_back_and_export_touches_nothing(workdir, tmp_path, capsys, caplog,
                                                           missing):
  step2 = workdir / "checkpoints" / "2"
  _remove(step2, missing)
  before = _snapshot(workdir)

  code, out, err = _cli(capsys, "export", "--workdir", str(workdir), "--out",
                        str(tmp_path / "bundle"))
  assert code == 0, err
  assert f"exported step 1 of {workdir}" in out
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 2 in" in warnings[0], warnings
  assert "\n" not in warnings[0]
  assert _snapshot(workdir) == before  # export leaves unreadable steps in place


def _remove(step_dir, missing):
  if missing == "array files":
    for path in _array_files(step_dir):
      path.unlink()
  elif missing == "tree metadata":
    (step_dir / "state" / "_METADATA").unlink()
  elif missing == "data iterator":
    shutil.rmtree(step_dir / "data")
  else:  # truncated: the largest array file cut in half
    biggest = max(_array_files(step_dir), key=os.path.getsize)
    os.truncate(biggest, os.path.getsize(biggest) // 2)


@pytest.mark.parametrize("missing", ["truncated", "array files", "tree metadata",
                                     "data iterator"])
def test_corrupt_steps_fall_back_when_training_resumes(workdir, caplog, capfd, missing):
  """The training path (`Checkpointer.restore`) falls back to step 1 with one warning
  line, sets step 2 aside as it was, and prints no asyncio tracebacks."""
  config = export.load_config(str(workdir))
  abstract, iterator = _abstract_and_iterator(config)
  step2 = workdir / "checkpoints" / "2"
  _remove(step2, missing)
  corrupt = _snapshot(step2)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
  try:
    state, step = checkpointer.restore(abstract, iterator)
  finally:
    checkpointer.close()
  assert step == 1 and int(state.step) == 1
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2.unreadable"]
  assert _snapshot(workdir / "checkpoints" / "2.unreadable") == corrupt
  warnings = [r.getMessage() for r in caplog.records if "is unreadable" in r.getMessage()]
  assert len(warnings) == 1 and "checkpoint step 2 in" in warnings[0], warnings
  assert "\n" not in warnings[0]
  out, err = capfd.readouterr()
  assert "Traceback" not in out + err and "Event loop is closed" not in out + err, err[-3000:]


def test_a_data_position_the_iterator_refuses_stops(workdir):
  """A saved iterator position that decodes but does not fit the current pipeline is a
  mismatch, not corruption: the run stops and nothing is renamed."""
  config = export.load_config(str(workdir))
  abstract, iterator = _abstract_and_iterator(config)
  for path in (workdir / "checkpoints" / "2" / "data").glob("process_*.json"):
    path.write_text('{"unknown_position": 3}')
  before = _snapshot(workdir)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
  with pytest.raises(checkpoint_lib.CheckpointMismatch,
                     match="checkpoints/2: the data iterator's saved position does not fit"):
    checkpointer.restore(abstract, iterator)
  assert _snapshot(workdir) == before


def _runtime_and_iterator(config):
  frozen = frozen_lib.frozen_variables(config, config.train.seed + 1, None)
  rt = runtime.create(config, 1, frozen)
  source = sources.open_source(config.data.source)
  iterator = iter(pipeline.make_loader(config.data, source, config.model.size,
                                       config.train.global_batch))
  return rt, iterator


def _abstract_and_iterator(config):
  rt, iterator = _runtime_and_iterator(config)
  abstract = jax.eval_shape(lambda: runtime.init_state(rt, jax.random.key(0)))
  return checkpoint_lib.abstract_with_shardings(abstract, rt.state_sharding), iterator


def _blur_config(tmp_path):
  """A config file of the user's: tiny with another FIR filter (no shape changes)."""
  path = tmp_path / "blur.py"
  path.write_text(
      "from g2face_jax import config as config_lib\n\n"
      "def get_config(arg):\n"
      "  config = config_lib.load(arg)\n"
      "  config.unlock()\n"
      "  config.model.blur_taps = (1, 2, 1)\n"
      "  config.lock()\n"
      "  return config\n")
  return str(path)


@pytest.mark.parametrize("change", ["style_dim", "blur_taps"])
def test_other_model_settings_are_refused_touching_nothing(workdir, tmp_path, capsys, change):
  """`model.style_dim` changes shapes, `model.blur_taps` none: both are refused by the
  workdir's recorded config before anything is read or written."""
  if change == "style_dim":
    spec, want = CONFIG.format(n=4) + ",model.style_dim=16", "model.style_dim 32 -> 16"
  else:
    spec, want = _blur_config(tmp_path) + ":" + CONFIG.format(n=4), \
        "model.blur_taps (1, 3, 3, 1) -> (1, 2, 1)"
  before = _snapshot(workdir)
  code, out, err = _cli(capsys, "train", "--config", spec, "--workdir", str(workdir),
                        "--compile-cache", "")
  assert code == 2
  line = _one_error_line(err, "train")
  assert str(workdir) in line and want in line, line
  assert _snapshot(workdir) == before


def test_a_step_that_does_not_fit_stops_before_reading_arrays(workdir, capsys):
  """Without the recorded config (a workdir written by the library), the checkpoint's
  own metadata refuses the resume: one line naming the step and the first differing
  arrays, saved vs expected; the workdir stays byte-identical."""
  os.remove(workdir / export.CONFIG_SPEC)
  checkpoints = _snapshot(workdir)
  code, out, err = _cli(capsys, "train", "--config", CONFIG.format(n=4) + ",model.style_dim=16",
                        "--workdir", str(workdir), "--compile-cache", "")
  assert code == 2
  line = _one_error_line(err, "train")
  assert f"checkpoint {workdir / 'checkpoints' / '2'} does not match the config" in line
  assert "saved (32, 32) float32, expected (16, 32) float32" in line, line
  assert "resumed" not in out and "starting from step 0" not in out
  assert _snapshot(workdir) == checkpoints


def test_other_sections_may_change_and_the_spec_is_rewritten(workdir):
  spec = CONFIG.format(n=7) + ",train.lr=0.002"
  export.save_config_spec(str(workdir), spec)
  assert (workdir / export.CONFIG_SPEC).read_text() == spec + "\n"
  assert export.load_config(str(workdir)).train.num_steps == 7


def _chmod_blocks_reading(path):
  os.chmod(path, 0)
  try:
    with open(path, "rb"):
      return False  # root reads regardless of the mode
  except PermissionError:
    return True


@pytest.mark.parametrize("command", ["train", "export"])
def test_io_error_stops_touching_nothing(workdir, tmp_path, capsys, monkeypatch, command):
  """chmod 000 on the newest step's files where that blocks reading; as root, the
  restore's read fails with EIO instead."""
  step2 = workdir / "checkpoints" / "2"
  files = sorted(p for p in step2.rglob("*") if p.is_file())
  before, checkpoints = _snapshot(workdir), _snapshot(workdir / "checkpoints")
  if not _chmod_blocks_reading(files[0]):
    os.chmod(files[0], 0o644)

    def eio(self, *args, **kwargs):
      raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(ocp.CheckpointManager, "restore", eio)
  else:
    for path in files:
      os.chmod(path, 0)
  try:
    argv = (["train", "--config", CONFIG.format(n=4), "--compile-cache", ""]
            if command == "train" else ["export", "--out", str(tmp_path / "bundle")])
    code, out, err = _cli(capsys, *argv, "--workdir", str(workdir))
  finally:
    for path in files:
      os.chmod(path, 0o644)
  assert code == 2
  line = _one_error_line(err, command)
  assert f"checkpoint {step2}: I/O error" in line and "nothing was changed" in line, line
  assert "resumed" not in out and "exported" not in out
  assert _snapshot(workdir / "checkpoints") == checkpoints
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("error, kind", [
    (ValueError("UNAVAILABLE: Error reading local file \"x\": Input/output error "
                "[os_error_code='5']"), "io"),
    (ValueError("PERMISSION_DENIED: Error reading local file \"x\": Permission denied"), "io"),
    (ValueError("DATA_LOSS: Error reading \"params.x/0\": checksum mismatch"), "corrupt"),
    (ValueError("FAILED_PRECONDITION: Error reading \"params.x/0\": Truncated Zstd-compressed "
                "stream"), "corrupt"),
    (MemoryError("out of host memory"), "other"),
])
def test_restore_errors_are_judged_by_the_rule(workdir, monkeypatch, caplog, error, kind):
  """TensorStore's errors arrive wrapped by orbax: storage statuses stop the run,
  data statuses fall back, anything else propagates; only a fallback renames."""
  config = export.load_config(str(workdir))
  abstract, _ = _abstract_and_iterator(config)
  calls = []

  def failing(self, step, *args, **kwargs):
    calls.append(step)
    if step == 2:
      try:
        raise error
      except type(error) as e:
        raise Exception("Encountered error while reading array index: (slice(0, 8, 1),)") from e
    return original(self, step, *args, **kwargs)
  original = ocp.CheckpointManager.restore
  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
  before = _snapshot(workdir)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
  if kind == "io":
    with pytest.raises(checkpoint_lib.CheckpointIOError, match="checkpoints/2: I/O error"):
      checkpointer.restore_state(abstract)
  elif kind == "other":
    with pytest.raises(Exception, match="Encountered error"):
      checkpointer.restore_state(abstract)
  else:
    _, step = checkpointer.restore_state(abstract)
    assert step == 1
    assert any(str(error).split(":")[0] in r.getMessage() for r in caplog.records)
  checkpointer.close()
  assert _snapshot(workdir) == before and calls[0] == 2


def test_a_file_that_cannot_be_read_is_an_io_error_not_corruption(workdir, monkeypatch):
  """An error that looks like bad data is checked by reading every file of the step:
  a read that fails (EIO) makes it an I/O error, and nothing is renamed."""
  config = export.load_config(str(workdir))
  abstract, iterator = _abstract_and_iterator(config)

  def data_loss(self, *args, **kwargs):
    raise ValueError("DATA_LOSS: Error reading \"params.x/0\": checksum mismatch")
  monkeypatch.setattr(ocp.CheckpointManager, "restore", data_loss)
  step2 = workdir / "checkpoints" / "2"
  unreadable = str(max(_array_files(step2), key=os.path.getsize))
  path_type = type(epath.Path(unreadable))
  original_open = path_type.open

  def open_(self, *args, **kwargs):
    if os.fspath(self) == unreadable:
      raise OSError(errno.EIO, "Input/output error", unreadable)
    return original_open(self, *args, **kwargs)
  monkeypatch.setattr(path_type, "open", open_)
  before = _snapshot(workdir)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"), config.checkpoint)
  with pytest.raises(checkpoint_lib.CheckpointIOError, match=f"cannot read {unreadable}"):
    checkpointer.restore(abstract, iterator)
  assert _snapshot(workdir) == before
