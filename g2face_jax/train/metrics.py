"""Training metrics and pictures on process 0: console lines, `metrics.jsonl`,
TensorBoard event files (tensorboardX, no TensorFlow) and PNG sample grids.

(clu's own writers import TensorFlow at package import, so the writers here are
small; the averaging over each logging interval uses `clu.metrics.Average`.)
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from clu import metrics as clu_metrics

from g2face_jax import images


class IntervalAverages:
  """Means of each scalar over the steps since the last `flush`."""

  def __init__(self):
    self._avg: dict[str, clu_metrics.Average] = {}

  def add(self, scalars: dict) -> None:
    for k, v in scalars.items():
      new = clu_metrics.Average.from_model_output(np.asarray(v, np.float32))
      self._avg[k] = self._avg[k].merge(new) if k in self._avg else new

  def flush(self) -> dict[str, float]:
    out = {k: float(a.compute()) for k, a in self._avg.items()}
    self._avg = {}
    return out


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
  """rows of (B, S, S, 3) images in [-1, 1] (e.g. input | anonymized | recovered) ->
  one uint8 picture with a column per sample and a row per kind, clipped to [-1, 1]."""
  stacked = np.stack([np.asarray(r, np.float32) for r in rows])  # (R, B, S, S, 3)
  r, b, s, _, c = stacked.shape
  pixels = images.to_uint8(stacked)
  return pixels.transpose(0, 2, 1, 3, 4).reshape(r * s, b * s, c)


class Writer:
  """Writes on process 0 only; every other process gets a silent writer."""

  def __init__(self, workdir: str, log=print, tensorboard: bool = True):
    self.active = jax.process_index() == 0
    self.log = log
    self.workdir = workdir
    self._tb = None
    if not self.active:
      return
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log("tensorboardX is not installed: no TensorBoard files (metrics.jsonl has every scalar)")

  def scalars(self, step: int, values: dict[str, float], console_keys=None) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
    self._jsonl.flush()
    if self._tb:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
    keys = console_keys or sorted(values)
    self.log(f"step {step}: " + "  ".join(f"{k} {values[k]:.4g}" for k in keys if k in values))

  def grid(self, step: int, name: str, rows: list[np.ndarray]) -> str | None:
    """Save a sample grid PNG (and a TensorBoard image); returns the PNG path."""
    if not self.active:
      return None
    picture = image_grid(rows)
    path = os.path.join(self.workdir, "samples", f"{name}_{step:07d}.png")
    images.write_png(path, picture)
    if self._tb:
      self._tb.add_image(name, picture, step, dataformats="HWC")
    return path

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      if self._tb:
        self._tb.close()
