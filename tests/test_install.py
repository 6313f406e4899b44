"""A non-editable install works from any folder: the wheel carries the configs, and
`g2face train --config tiny,...` runs from an empty folder with nothing of the
source tree in reach."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
  """The project's wheel, built and unpacked into a folder of its own (its dependencies
  are this environment's); returns that folder."""
  wheels = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), ROOT], check=True, capture_output=True, text=True)
  (wheel,) = glob.glob(str(wheels / "g2face_jax-*.whl"))
  target = tmp_path_factory.mktemp("site")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(target), wheel], check=True, capture_output=True, text=True)
  return str(target)


def _run(installed: str, cwd: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=installed, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_carries_the_configs(installed, tmp_path):
  done = _run(installed, str(tmp_path), "-c",
              "import g2face_jax, g2face_jax.config as c; print(g2face_jax.__file__); "
              "print(c.DEFAULT_FILE); print(c.load('paper').model.size)")
  assert done.returncode == 0, done.stderr
  package, config_file, size = done.stdout.split()
  assert package.startswith(installed) and config_file.startswith(installed)
  assert size == "256"


@pytest.mark.slow
def test_train_from_an_empty_folder(installed, tmp_path):
  done = _run(installed, str(tmp_path), "-m", "g2face_jax.cli", "train",
              "--config", "tiny,train.num_steps=1", "--workdir", "w", "--compile-cache", "")
  assert done.returncode == 0, done.stderr[-2000:]
  assert os.path.isdir(tmp_path / "w" / "checkpoints")
