"""Load ml_collections configs given as 'path/to/file.py:ARG' (big_vision style)."""
from __future__ import annotations

import importlib.util
import os

import ml_collections

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs", "g2face.py")


def load(spec: str = "paper") -> ml_collections.ConfigDict:
  """'configs/g2face.py:tiny,model.size=64' or just 'tiny' (the bundled configs/g2face.py)."""
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
