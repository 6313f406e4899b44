"""Per-image transforms: decode, resize with antialiasing, random flip, [-1, 1].

The official data path is torchvision Resize((256, 256)) on PIL images (PIL
bilinear, which filters over the whole footprint when shrinking), a random
horizontal flip and Normalize(0.5, 0.5); the same steps here, NHWC.
"""
from __future__ import annotations

import io

import grain
import numpy as np
from PIL import Image


def decode(record) -> Image.Image:
  """Encoded bytes or an (H, W[, C]) uint8 array -> an RGB PIL image."""
  if isinstance(record, (bytes, bytearray)):
    image = Image.open(io.BytesIO(record))
  else:
    image = Image.fromarray(np.asarray(record, np.uint8).squeeze())
  return image.convert("RGB")


def resize(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> (size, size, 3) uint8, PIL bilinear with antialiasing (torchvision's Resize)."""
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """uint8 (..., 3) -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
  return (pixels.astype(np.float32) / 255.0 - 0.5) / 0.5


class DecodeResize(grain.transforms.Map):
  def __init__(self, size: int):
    self.size = size

  def map(self, record) -> np.ndarray:
    return resize(decode(record), self.size)


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (seeded by Grain per record)."""

  def random_map(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


class ToUnitRange(grain.transforms.Map):
  def map(self, pixels: np.ndarray) -> np.ndarray:
    return to_unit_range(pixels)
