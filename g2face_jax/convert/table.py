"""Name tables: official state-dict keys -> Flax paths, with a per-tensor transform.

A converter is a list of `Rule`s plus an ignore list. `apply_rules` checks that
every official key is used by a rule or named as ignored, that every expected
Flax leaf is produced, and that every shape matches; each failure is a
`ConversionError` naming the key.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
  """An official checkpoint does not fit the expected layout."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """`pattern` (regex, full match on the official key) -> `target` ('/'-separated Flax
  path, may use \\1 group references), through `transform`."""
  pattern: str
  target: str
  transform: Transform = lambda a: a


BATCHNORM_IGNORED = [r".*num_batches_tracked"]


def batchnorm_rules(official: str, flax: str) -> list[Rule]:
  """BatchNorm1d/2d at official prefix `official` (regex) -> Flax module path `flax`:
  weight/bias into 'params' scale/bias, running statistics into 'batch_stats' mean/var."""
  return [
      Rule(official + r"\.weight", f"params/{flax}/scale"),
      Rule(official + r"\.bias", f"params/{flax}/bias"),
      Rule(official + r"\.running_mean", f"batch_stats/{flax}/mean"),
      Rule(official + r"\.running_var", f"batch_stats/{flax}/var"),
  ]


# Per-tensor transforms from PyTorch layouts.
def conv_oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))


def modconv_to_hwio(w: np.ndarray) -> np.ndarray:
  """(1, Cout, Cin, k, k) modulated-conv weight -> (k, k, Cin, Cout)."""
  return np.transpose(w[0], (2, 3, 1, 0))


def linear_to_io(w: np.ndarray) -> np.ndarray:
  return np.transpose(w)


def flatten(w: np.ndarray) -> np.ndarray:
  return np.reshape(w, (-1,))


def nchw_to_nhwc(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (0, 2, 3, 1))


def linear_reading_nchw_flatten(c: int, h: int, w: int) -> Transform:
  """(out, C*H*W) weight of a linear layer reading PyTorch's NCHW flatten ->
  (H*W*C, out) for an NHWC flatten."""
  order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)

  def transform(weight: np.ndarray) -> np.ndarray:
    if weight.shape[1] != c * h * w:
      raise ConversionError(f"expected {c * h * w} inputs, found {weight.shape[1]}")
    return np.transpose(weight[:, order])

  return transform


def apply_rules(state_dict: Mapping[str, Any], rules: Iterable[Rule], expected: Mapping[str, Any],
                ignore: Iterable[str] = (), what: str = "checkpoint") -> dict:
  """Convert `state_dict` to a nested dict shaped like `expected`.

  expected: nested dict of arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape`).
  ignore: regexes (full match) of official keys deliberately not used.
  """
  rules = list(rules)
  ignore = [re.compile(p) for p in ignore]
  want = {"/".join(k): v for k, v in traverse_util.flatten_dict(expected).items()}
  out: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in state_dict.items():
    for rule in rules:
      m = re.fullmatch(rule.pattern, key)
      if m:
        break
    else:
      if not any(p.fullmatch(key) for p in ignore):
        unknown.append(key)
      continue
    target = m.expand(rule.target)
    if target not in want:
      raise ConversionError(f"{what}: key '{key}' maps to '{target}', which this model "
                            "configuration does not have (wrong checkpoint or config?)")
    array = np.asarray(value, dtype=np.float32)
    try:
      array = rule.transform(array)
    except (ValueError, ConversionError) as e:
      raise ConversionError(f"{what}: key '{key}' has shape {tuple(np.shape(value))}: {e}") from None
    if tuple(array.shape) != tuple(want[target].shape):
      raise ConversionError(
          f"{what}: key '{key}' has shape {tuple(np.shape(value))}, which does not give the "
          f"expected {tuple(want[target].shape)} for '{target}'")
    if target in out:
      raise ConversionError(f"{what}: keys map twice onto '{target}' (second: '{key}')")
    out[target] = array
  if unknown:
    raise ConversionError(f"{what}: unexpected key(s) {sorted(unknown)[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''} ({len(unknown)} in all)")
  missing = sorted(set(want) - set(out))
  if missing:
    raise ConversionError(f"{what}: missing weights for {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})


def check_constant(state_dict: Mapping[str, Any], pattern: str, expected: np.ndarray,
                   what: str = "checkpoint") -> None:
  """Every key matching `pattern` must hold `expected` (e.g. fixed FIR kernels)."""
  for key, value in state_dict.items():
    if re.fullmatch(pattern, key):
      value = np.asarray(value, np.float32)
      if value.shape != expected.shape or not np.allclose(value, expected, rtol=1e-6, atol=1e-7):
        raise ConversionError(f"{what}: constant '{key}' differs from the kernel this "
                              "configuration uses")
