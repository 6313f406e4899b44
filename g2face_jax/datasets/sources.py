"""Random-access sources of face images for Grain.

A record is either encoded image bytes (JPEG/PNG: folders, ArrayRecord shards)
or an (H, W, 3) / (H, W) uint8 array (the demo set, TFDS); `transforms.decode`
takes both. Folders hold the files `images` reads (`images.SUFFIXES`). `open_source(spec)` picks the source from the config's `data.source`:
  'demo'                 the bundled demo set (scikit-image's LFW face crops)
  'arrayrecord:GLOB'     ArrayRecord shards written by `g2face prepare-data`
  'tfds:NAME[:SPLIT]'    a prepared TensorFlow Datasets dataset (optional extra)
  anything else          an image folder, searched recursively
"""
from __future__ import annotations

import glob
import os

import grain
import numpy as np

from g2face_jax import images

DEMO_FACES = 100  # lfw_subset holds 100 face crops followed by 100 non-faces


def list_images(root: str) -> list[str]:
  """Image files under root (recursive), sorted for a stable order."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: image folder not found")
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.lower().endswith(images.SUFFIXES) and not f.startswith("."))
  if not paths:
    raise ValueError(f"{root}: no images ({', '.join(images.SUFFIXES)}) in this folder")
  return paths


class ImageFolderSource(grain.sources.RandomAccessDataSource):
  """Encoded bytes of every image file under a folder (recursive)."""

  def __init__(self, root: str):
    self.paths = list_images(root)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> bytes:
    with open(self.paths[index], "rb") as f:
      return f.read()

  def __repr__(self) -> str:
    return f"ImageFolderSource({len(self.paths)} images)"


class DemoSource(grain.sources.RandomAccessDataSource):
  """Demo set: the 100 LFW face crops shipped with scikit-image (25x25 grayscale,
  real faces, far below training quality; for smoke runs and tests only)."""

  def __init__(self):
    from skimage import data
    faces = data.lfw_subset()[:DEMO_FACES]  # (100, 25, 25) float in [0, 1]
    self.images = np.round(faces * 255).astype(np.uint8)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> np.ndarray:
    return self.images[index]

  def __repr__(self) -> str:
    return f"DemoSource(scikit-image lfw_subset, {len(self.images)} faces)"


class TfdsSource(grain.sources.RandomAccessDataSource):
  """The 'image' feature of a prepared TFDS dataset (needs `tensorflow-datasets`)."""

  def __init__(self, name: str, split: str = "train"):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ValueError("tfds sources need the optional package tensorflow-datasets "
                       "(pip install tensorflow-datasets)") from None
    self._source = tfds.data_sources.load(name, split=split) if hasattr(tfds, "data_sources") \
        else tfds.data_source(name, split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return self._source[index]["image"]


def open_source(spec: str) -> grain.sources.RandomAccessDataSource:
  """The source named by the config's `data.source` (see the module docstring)."""
  if spec == "demo":
    return DemoSource()
  if spec.startswith("arrayrecord:"):
    pattern = spec.removeprefix("arrayrecord:")
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise FileNotFoundError(f"{pattern}: no ArrayRecord shards match")
    return grain.sources.ArrayRecordDataSource(paths)
  if spec.startswith("tfds:"):
    name, _, split = spec.removeprefix("tfds:").partition(":")
    return TfdsSource(name, split or "train")
  return ImageFolderSource(spec)
