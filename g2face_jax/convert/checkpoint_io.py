"""Read official PyTorch checkpoint files without running code from them.

The only module of the package that imports torch (inside functions, so the
package imports without it). Files are read with
`torch.load(weights_only=True)`: tensors, plain containers and numbers only,
plus this allow-list for what the official files hold besides weights:

- `argparse.Namespace`: the `args` entry of rosinality's `550000.pt` (plain values).
- The `scheduler` entry of G2Face training copies is the warm-up scheduler's
  `state_dict()`, which holds its `after_scheduler` (an `ExponentialLR`, with
  the `Adam` optimizer inside) as a whole object. Those classes are never
  loaded: their names are mapped to inert `Skipped` stand-ins that keep only
  the name, and the optimizer's per-parameter `defaultdict` becomes a plain dict.

Anything else a pickle asks for is refused with a one-line ConversionError
naming the file and what was refused; there is no fallback to a full unpickle.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

from g2face_jax.convert.table import ConversionError

TORCH_MISSING = "install the torch extra: pip install -e .[torch]"
# Whole objects inside G2Face training copies (`scheduler`); replaced by stand-ins.
SKIPPED_CLASSES = ("torch.optim.lr_scheduler.ExponentialLR", "torch.optim.adam.Adam")


class Skipped:
  """Stand-in for an object the model does not need (an LR scheduler or optimizer
  pickled whole). No code of the original class runs; `original` is its name."""
  original = ""

  def __repr__(self) -> str:
    return f"<skipped {self.original}>"


def _stand_in(qualified_name: str) -> type:
  return type(qualified_name.rsplit(".", 1)[-1], (Skipped,), {"original": qualified_name})


def _plain_dict(default_factory=None) -> dict:
  """Replaces `collections.defaultdict` (the optimizer's per-parameter state)."""
  del default_factory
  return {}


def _allowed_globals() -> list:
  return ([argparse.Namespace, dict, (_plain_dict, "collections.defaultdict")]
          + [(_stand_in(name), name) for name in SKIPPED_CLASSES])


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(TORCH_MISSING) from None
  return torch


def _refusal(path: str, error: Exception) -> ConversionError:
  """torch's multi-paragraph UnpicklingError -> one line naming the file and what was refused."""
  text = str(error)
  refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
  if refused:
    return ConversionError(f"{path}: refused to load '{refused.group(1)}': a weights-only load "
                           "allows only tensors, plain containers and the known checkpoint entries")
  detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
  reason = detail.group(1).strip() if detail else text.strip().splitlines()[0]
  return ConversionError(f"{path}: not a PyTorch checkpoint of weights ({reason})")


def to_numpy(obj: Any) -> Any:
  """Tensors -> NumPy (floating -> float32, integer and bool -> int64), recursively
  through mappings (-> dict), lists and tuples; `Skipped` stand-ins -> their repr."""
  torch = _import_torch()

  def convert(o):
    if isinstance(o, torch.Tensor):
      t = o.detach().cpu()
      return t.float().numpy() if t.is_floating_point() else t.long().numpy()
    if isinstance(o, dict):
      return {k: convert(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return type(o)(convert(v) for v in o)
    if isinstance(o, Skipped):
      return repr(o)
    return o

  return convert(obj)


def load_state_file(path: str | os.PathLike) -> Any:
  """A `.pth` / `.pt` file -> its content with every tensor as a NumPy array.

  Raises FileNotFoundError, ImportError (no torch) or a one-line ConversionError
  (refused object, not a PyTorch file).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: file not found")
  torch = _import_torch()
  try:
    with torch.serialization.safe_globals(_allowed_globals()):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except OSError:
    raise
  except Exception as e:  # torch raises many types for a file it cannot read
    if "Weights only load failed" in str(e):
      raise _refusal(path, e) from None
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise ConversionError(f"{path}: not a PyTorch checkpoint ({type(e).__name__}: {first_line})") from None
  return to_numpy(obj)
