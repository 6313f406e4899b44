"""A non-editable install works from any folder: the wheel carries the configs, and
`g2face train --config tiny,...` runs from an empty folder with nothing of the
source tree in reach.

The wheel is installed into a fresh virtual environment whose dependencies are this
environment's packages (a path file appends this environment's site-packages, without
running its path files, so an editable install of the project stays out of reach): the
test needs no download, and the package, its configs and its `g2face` script are the
venv's own copies.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = os.path.join(ROOT, "data", "group_photo.jpg")  # two faces


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
  """The project's wheel, built from this tree."""
  wheels = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), ROOT], check=True, capture_output=True, text=True)
  (path,) = glob.glob(str(wheels / "g2face_jax-*.whl"))
  return path


def _fresh_venv(folder: str) -> str:
  """A new venv at `folder` that finds this environment's packages but not the project."""
  subprocess.run([sys.executable, "-m", "venv", folder], check=True, capture_output=True,
                 text=True)
  python = os.path.join(folder, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "dependencies.pth"), "w", encoding="utf-8") as f:
    f.write("".join(f"{path}\n" for path in sorted(ours)))
  return folder


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> str:
  """A fresh venv with the project's wheel installed (not editable); returns its folder."""
  folder = _fresh_venv(str(tmp_path_factory.mktemp("venv") / "env"))
  subprocess.run([os.path.join(folder, "bin", "python"), "-m", "pip", "install", "-q",
                  "--no-deps", "--no-index", wheel], check=True, capture_output=True, text=True)
  return folder


def _run(venv: str, cwd: str, program: str, *args: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
  return subprocess.run([os.path.join(venv, "bin", program), *args], cwd=cwd, env=env,
                        capture_output=True, text=True)


def test_the_wheel_carries_the_configs_and_the_detector(venv, tmp_path):
  done = _run(venv, str(tmp_path), "python", "-c",
              "import g2face_jax, g2face_jax.config as c; print(g2face_jax.__file__); "
              "print(c.DEFAULT_FILE); print(c.load('paper').model.size); "
              "from g2face_jax import faces, images; print(len(faces.detect(images.read("
              f"{GROUP!r}))))")
  assert done.returncode == 0, done.stderr
  package, config_file, size, found = done.stdout.split()
  assert package.startswith(venv) and config_file.startswith(venv)
  assert size == "256" and found == "2"  # CenterFace's weights came with the wheel


def test_the_installed_command_refuses_paper_without_pretrained_files(venv, tmp_path):
  done = _run(venv, str(tmp_path), "g2face", "train", "--config", "paper", "--workdir", "w")
  assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
  assert "ms1mv3_arcface_r50.pth" in done.stderr and not os.listdir(tmp_path)


@pytest.mark.slow
def test_train_from_an_empty_folder(venv, tmp_path):
  done = _run(venv, str(tmp_path), "g2face", "train", "--config", "tiny,train.num_steps=1",
              "--workdir", "w", "--compile-cache", "")
  assert done.returncode == 0, done.stderr[-2000:]
  assert os.path.isdir(tmp_path / "w" / "checkpoints")


def _install_cells() -> list[str]:
  import nbformat
  cells = []
  for name in sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb"))):
    nb = nbformat.read(name, as_version=4)
    cells += [c.source for c in nb.cells
              if c.cell_type == "code" and 'find_spec("g2face_jax")' in c.source]
  return cells


def test_the_colab_install_cell_installs_the_wheel_it_is_given(wheel, tmp_path):
  """Every notebook's install cell is the same, and on a runtime without the package it
  installs the uploaded wheel (no index here: pip's own environment variables keep it to
  the wheel), after which the package imports from the new install."""
  cells = _install_cells()
  assert len(cells) == len(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb"))) >= 1
  assert len(set(cells)) == 1
  env_folder = _fresh_venv(str(tmp_path / "runtime"))
  work = tmp_path / "content"
  work.mkdir()
  shutil.copy(wheel, work)
  cell = tmp_path / "install_cell.py"
  cell.write_text(cells[0] + "\nimport g2face_jax\nprint(g2face_jax.__file__)\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "G2FACE_SOURCE")}
  env.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1", PATH=os.path.join(env_folder, "bin"))  # a CPU runtime
  done = subprocess.run([os.path.join(env_folder, "bin", "python"), str(cell)], cwd=work, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().startswith(env_folder)
  empty = tmp_path / "empty"
  empty.mkdir()
  done = subprocess.run([os.path.join(env_folder, "bin", "python"), str(cell)], cwd=empty, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0  # installed now: the cell skips the install
