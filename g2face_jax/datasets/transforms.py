"""Per-record transforms of the training input pipeline: decode, resize, random flip, [-1, 1].

The official data path is torchvision Resize((256, 256)) on PIL images (PIL's
antialiased bilinear), a random horizontal flip and Normalize(0.5, 0.5); the
same steps here, NHWC, through `images` (the reader, resize and range that
inference and evaluation use, so a file gives the model the same pixels on
every road).
"""
from __future__ import annotations

import grain
import numpy as np

from g2face_jax import images


def decode(record) -> np.ndarray:
  """A record: encoded image bytes or an (H, W[, C]) uint8 array -> (H, W, 3) uint8 RGB."""
  if isinstance(record, (bytes, bytearray)):
    return images.decode(bytes(record), "record")
  return images.from_array(record)


class DecodeResize(grain.transforms.Map):
  """A record -> (size, size, 3) uint8 RGB."""

  def __init__(self, size: int):
    self.size = size

  def map(self, record) -> np.ndarray:
    return images.resize(decode(record), self.size)


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (seeded by Grain per record)."""

  def random_map(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


class ToUnitRange(grain.transforms.Map):
  """uint8 pixels -> float32 in [-1, 1]."""

  def map(self, pixels: np.ndarray) -> np.ndarray:
    return images.to_unit(pixels)
