"""Load ml_collections configs given as 'path/to/file.py:ARG' (big_vision style)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections


def _bundled_file() -> str:
  """The bundled configs/g2face.py: installed as `g2face_jax.configs`, or in the source tree."""
  spec = importlib.util.find_spec("g2face_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return os.path.join(list(spec.submodule_search_locations)[0], "g2face.py")
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "g2face.py")


DEFAULT_FILE = _bundled_file()


def load(spec: str = "paper") -> ml_collections.ConfigDict:
  """'tiny,model.size=64' (the bundled configs/g2face.py, found after any install) or a
  file of the user's, 'path/to/file.py:tiny,model.size=64'."""
  if ".py" in spec:
    path, _, arg = spec.partition(".py")
    path, arg = path + ".py", arg.removeprefix(":")
  else:
    path, arg = DEFAULT_FILE, spec
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: config file not found")
  module_spec = importlib.util.spec_from_file_location("g2face_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
