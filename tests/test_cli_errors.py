"""Every subcommand reports an ordinary failure in one line on stderr and a non-zero exit
(2: the input, files or config were refused; 1: the run itself failed), and `--debug`
gives the traceback instead."""
import os

import jax
import pytest

from g2face_jax import cli
from g2face_jax.privacy import keys


def _one_line_error(capsys, command, argv, code=2):
  assert cli.main(argv) == code
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err, err
  assert err.startswith(f"g2face {command}: error: "), err
  return err[len(f"g2face {command}: error: "):]


@pytest.mark.parametrize("command, argv, names", [
    ("parity", ["--fixtures", "{tmp}/none"], "{tmp}/none"),
    ("convert", ["--arcface", "{tmp}/none.pth", "--out", "{tmp}/b"], "{tmp}/none.pth"),
    ("anonymize", ["{tmp}", "--out", "{tmp}/o", "--bundle", "{tmp}/nb", "--key", "{tmp}/k.key"], "{tmp}/nb"),
    ("recover", ["{tmp}", "--out", "{tmp}/o", "--bundle", "{tmp}/nb", "--key", "{tmp}/k.key"], "{tmp}/nb"),
    ("verify", ["{tmp}/a.png", "--reference", "{tmp}/r.png", "--bundle", "{tmp}/nb", "--key", "{tmp}/k.key"], "{tmp}/nb"),
    ("eval", ["--data", "{tmp}", "--out", "{tmp}/o", "--bundle", "{tmp}/nb", "--key", "{tmp}/k.key"], "{tmp}/nb"),
    ("export", ["--workdir", "{tmp}/w", "--out", "{tmp}/o"], "{tmp}/w"),
    ("prepare-data", ["{tmp}/none", "--out", "{tmp}/o"], "{tmp}/none"),
    ("compile", ["--topology", "v9-8"], "v9-8"),
    ("bench", ["--cpu-devices", "2", "--devices", "1,2"], "--cpu-devices"),
])
def test_refusals_are_one_line_naming_the_culprit(command, argv, names, tmp_path, capsys):
  tmp = str(tmp_path)
  keys.write_key_file(str(tmp_path / "k.key"))
  message = _one_line_error(capsys, command, [command] + [a.format(tmp=tmp) for a in argv])
  assert names.format(tmp=tmp) in message
  assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "b")


def test_keygen_never_overwrites_and_says_so(tmp_path, capsys):
  key = tmp_path / "my.key"
  key.write_bytes(b"precious")
  assert str(key) in _one_line_error(capsys, "keygen", ["keygen", "--out", str(key)])
  assert key.read_bytes() == b"precious"


def test_paper_training_without_pretrained_files_is_refused_at_once(tmp_path, capsys):
  """Before anything is built or written: the message lists every missing file and the
  way out; the workdir is not created."""
  workdir = tmp_path / "run"
  message = _one_line_error(capsys, "train", ["train", "--config", "paper", "--workdir",
                                              str(workdir)])
  for name in ("ms1mv3_arcface_r50.pth", "epoch_20.pth", "vgg.pth", "BFM_model_front.mat",
               "550000.pt", "pretrained.allow_random=True", "g2face convert"):
    assert name in message
  assert not workdir.exists()


def test_paper_training_on_the_demo_faces_is_refused(tmp_path, capsys):
  message = _one_line_error(capsys, "train", [
      "train", "--config", "paper,pretrained.allow_random=True", "--workdir", str(tmp_path / "r")])
  assert "data.source" in message and "data.allow_demo=True" in message
  assert not (tmp_path / "r").exists()


def _failing(error):
  def run(*args, **kwargs):
    raise error
  return run


def test_a_failed_run_is_one_line_with_its_kind(monkeypatch, tmp_path, capsys):
  """A non-finite loss in training and an XLA runtime error in bench: exit 1, the error's
  type and first line; the rest of a long XLA message stays behind --debug."""
  from g2face_jax.tools import bench
  from g2face_jax.train import loop
  monkeypatch.setattr(loop, "train", _failing(FloatingPointError(
      "steps 11 to 20: non-finite ['anon/total']; stopping")))
  message = _one_line_error(capsys, "train", ["train", "--config", "tiny", "--workdir",
                                              str(tmp_path / "w"), "--compile-cache", ""], code=1)
  assert message == "FloatingPointError: steps 11 to 20: non-finite ['anon/total']; stopping"
  oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                   "17.2GiB.\nBufferAssignment OOM Debugging.\n  allocation 0")
  monkeypatch.setattr(bench, "run", _failing(oom))
  message = _one_line_error(capsys, "bench", ["bench", "--config", "tiny"], code=1)
  assert message.startswith("JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying")
  assert "--debug" in message and "BufferAssignment" not in message


def test_debug_gives_the_traceback(monkeypatch, tmp_path):
  from g2face_jax.train import loop
  monkeypatch.setattr(loop, "train", _failing(FloatingPointError("step 3: non-finite")))
  with pytest.raises(FloatingPointError, match="step 3"):
    cli.main(["train", "--config", "tiny", "--workdir", str(tmp_path / "w"), "--compile-cache",
              "", "--debug"])
  with pytest.raises(FileNotFoundError):
    cli.main(["export", "--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
              "--debug"])


COMMANDS = ("parity", "convert", "keygen", "anonymize", "recover", "verify", "eval", "bench",
            "train", "export", "prepare-data", "compile")


def _help(argv, capsys) -> str:
  with pytest.raises(SystemExit):
    cli.build_parser().parse_args(argv)
  return capsys.readouterr().out


def test_every_subcommand_takes_debug(capsys):
  listed = _help(["--help"], capsys)
  assert all(name in listed for name in COMMANDS)
  for name in COMMANDS:
    assert "--debug" in _help([name, "--help"], capsys), name


@pytest.mark.parametrize("variant", ["smoke", "tiny"])
def test_smoke_and_tiny_say_what_they_stand_in_for(variant):
  from g2face_jax import config as config_lib
  from g2face_jax.train import pretrained
  lines = pretrained.preflight(config_lib.load(variant))
  assert any("random ArcFace" in line and "synthetic BFM" in line for line in lines)
  assert any("demo faces" in line for line in lines)
  real = config_lib.load(f"{variant},pretrained.bundle=B,data.source=/data/faces")
  assert pretrained.preflight(real) == []


def test_paper_with_a_bundle_and_real_data_passes_the_preflight():
  from g2face_jax import config as config_lib
  from g2face_jax.train import pretrained
  assert pretrained.preflight(config_lib.load("paper,pretrained.bundle=B,data.source=/d")) == []
  fresh = config_lib.load("paper,pretrained.allow_random=True,data.allow_demo=True")
  assert len(pretrained.preflight(fresh)) == 2
