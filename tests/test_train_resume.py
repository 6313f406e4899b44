"""`g2face train` killed with SIGKILL and resumed ends bit-identical to an uninterrupted run;
a corrupt newest checkpoint falls back to the previous one; export writes a loadable bundle."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from g2face_jax import bundle

STEPS = 4
CONFIG = ("configs/g2face.py:tiny,train.num_steps={n},checkpoint.every_steps=1,"
          "checkpoint.async_save=false,log.every_steps=1,log.sample_every_steps=0,log.samples=2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, cache, steps=STEPS, wait=True):
  cmd = [sys.executable, "-m", "g2face_jax.cli", "train", "--config", CONFIG.format(n=steps),
         "--workdir", str(workdir), "--compile-cache", str(cache)]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if wait:
    out, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, out
    return out
  return proc


def _params(workdir):
  b = bundle.load(str(workdir))
  return {f"{net}/{k}": np.asarray(v) for net in ("decoder", "map_2_id", "extractor", "discriminator")
          for k, v in _flat(b.variables[net]).items()}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _export(workdir, out):
  subprocess.run([sys.executable, "-m", "g2face_jax.cli", "export", "--workdir", str(workdir),
                  "--out", str(out)], cwd=ROOT, check=True, timeout=900)
  return _params(out)


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
  cache = tmp_path / "xla_cache"
  full = _train(tmp_path / "full", cache)
  assert f"step {STEPS}:" in full and "sample after step 4" in full

  proc = _train(tmp_path / "killed", cache, wait=False)
  marker = tmp_path / "killed" / "checkpoints" / "2"
  deadline = time.time() + 1500
  while not marker.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  resumed = _train(tmp_path / "killed", cache)
  assert "resumed from the checkpoint of step" in resumed

  want = _export(tmp_path / "full", tmp_path / "full_bundle")
  got = _export(tmp_path / "killed", tmp_path / "killed_bundle")
  assert want.keys() == got.keys() and len(want) > 50
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  # a corrupt newest checkpoint: training falls back to the previous one with a warning
  newest = tmp_path / "full" / "checkpoints" / str(STEPS)
  for path in newest.rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  again = _train(tmp_path / "full", cache, steps=STEPS)
  assert f"step {STEPS} in" in again and "unreadable" in again
  assert f"resumed from the checkpoint of step {STEPS - 1}" in again
  shutil.rmtree(newest, ignore_errors=True)
