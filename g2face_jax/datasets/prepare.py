"""`g2face prepare-data`: pack an image folder into ArrayRecord shards for Grain.

Each record is one image, PNG-encoded after an optional resize to `size`
(`images.resize`, as training resizes), or the file's own bytes when no size
is given. Shards are named `images-00000-of-00004.array_record`;
train with `data.source=arrayrecord:OUT/images-*.array_record`.
"""
from __future__ import annotations

import os

from array_record.python import array_record_module

from g2face_jax import images
from g2face_jax.datasets import sources


def _record(path: str, size: int | None) -> bytes:
  """The record of one image file; ImageError naming the file when it is not an image."""
  with open(path, "rb") as f:
    raw = f.read()
  pixels = images.decode(raw, path)  # fail here, not in training, on a file that is not an image
  return images.encode_png(images.resize(pixels, size)) if size else raw


def prepare(folder: str, out_dir: str, size: int | None = None, images_per_shard: int = 10_000,
            log=print) -> list[str]:
  """Write the images under `folder` (recursive) as shards in out_dir; returns the paths."""
  paths = sources.list_images(folder)
  os.makedirs(out_dir, exist_ok=True)
  n_shards = max(1, -(-len(paths) // images_per_shard))
  written = []
  for shard in range(n_shards):
    name = os.path.join(out_dir, f"images-{shard:05d}-of-{n_shards:05d}.array_record")
    writer = array_record_module.ArrayRecordWriter(name, "group_size:1")
    for path in paths[shard * images_per_shard:(shard + 1) * images_per_shard]:
      try:
        writer.write(_record(path, size))
      except (OSError, images.ImageError) as e:
        writer.close()
        raise ValueError(str(e) if isinstance(e, images.ImageError) else
                         f"{path}: not readable ({e})") from None
    writer.close()
    written.append(name)
    log(f"wrote {name}")
  return written
