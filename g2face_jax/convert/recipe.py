"""Rebuild the parity fixtures' recipe weights (`NAME.weights.json`) with NumPy.

Each entry draws its tensor from `default_rng([seed, crc32(key)])`, so the
result equals the official state dict the fixtures were computed with.
"""
from __future__ import annotations

import json
import os
import re
import zlib

import numpy as np


def seed_of(folder: str) -> int:
  """The seed is the number at the end of the folder name (`official-seed0` -> 0)."""
  m = re.search(r"(\d+)$", os.path.basename(os.path.normpath(folder)))
  if not m:
    raise ValueError(f"{folder}: fixture folder name must end with its seed number")
  return int(m.group(1))


def regenerate(path: str, seed: int) -> dict[str, np.ndarray]:
  """Recipe JSON -> {official key: array}, in the official state-dict order."""
  with open(path) as f:
    entries = json.load(f)
  out = {}
  for e in entries:
    key, shape, dist = e["key"], tuple(e["shape"]), e["dist"]
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if dist == "normal":
      a = (e["loc"] + e["scale"] * rng.standard_normal(shape)).astype(np.float32)
    elif dist == "uniform":
      a = rng.uniform(e["low"], e["high"], shape).astype(np.float32)
    elif dist == "zeros":
      a = np.zeros(shape, e.get("dtype", "float32"))
    elif dist == "keep":
      a = np.asarray(e["value"], np.float32).reshape(shape)
    else:
      raise ValueError(f"{path}: unknown distribution '{dist}' for '{key}'")
    out[key] = a
  return out
