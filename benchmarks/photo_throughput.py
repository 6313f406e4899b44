"""Seconds per face of the whole anonymize job against the model's own anonymize time.

    python benchmarks/photo_throughput.py [--config paper] [--photos 3] [--frames 6]
        [--rounds 2] [--json]

All in this one process, on a bundle of random weights of `--config`:
  model   `g2face bench`'s official anonymize chain at batch 1 (`tools.bench.run`):
          seconds per face, the best of its rounds;
  photos  `files.anonymize_file` (what `g2face anonymize` runs per file: read,
          detect, align, code the payload, anonymize, paste back, write the PNG)
          over a folder of `--photos` photos of six faces each (the bundled group
          photo three times, each copy shifted, so no two photos are alike);
  video   the same on a lossless `--frames`-frame clip of one such photo moving
          a pixel per frame (detection and tracking over frames, the faces of
          all frames batched).
Each job runs `--rounds` times; the last round counts (its programs compiled and
cached by the earlier ones). Prints seconds per face and the ratio job / model.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli_args import positive_int  # noqa: E402


def six_face_photo(shift: int) -> np.ndarray:
  """(960, 640 + 2 * 16, 3) uint8: the group photo three times, one above the other,
  on a grey margin, moved right by `shift` pixels (0..32)."""
  from g2face_jax import images
  group = images.read(os.path.join(ROOT, "data", "group_photo.jpg"))
  out = np.full((3 * group.shape[0], group.shape[1] + 32, 3), 118, np.uint8)
  for k in range(3):
    out[k * group.shape[0]:(k + 1) * group.shape[0], shift:shift + group.shape[1]] = group
  return out


def write_inputs(folder: str, photos: int, frames: int) -> tuple[list[str], str]:
  """The photos (PNG) and the lossless clip (Matroska FFV1) in `folder`."""
  from g2face_jax import images
  from g2face_jax.video import io
  paths = []
  for k in range(photos):
    paths.append(os.path.join(folder, f"photo{k}.png"))
    images.write_png(paths[-1], six_face_photo(4 * k))
  clip = os.path.join(folder, "clip.mkv")
  first = six_face_photo(0)
  with io.Writer(clip, first.shape[1], first.shape[0], fractions.Fraction(12)) as writer:
    for k in range(frames):
      writer.write(six_face_photo(k), k, fractions.Fraction(1, 12))
  return paths, clip


def run(config: str, photos: int, frames: int, rounds: int) -> dict:
  import jax

  from g2face_jax import bundle, config as config_lib, files, models, photo, video
  from g2face_jax.privacy import keys
  from g2face_jax.tools import bench
  model = bench.run(config, batch=1, rounds=max(rounds, 2))
  with tempfile.TemporaryDirectory() as tmp:
    cfg = config_lib.load(config)
    variables = models.init_variables(cfg.model, jax.random.key(0),
                                      names=models.INFERENCE_NETWORKS)
    bundle.save(os.path.join(tmp, "bundle"), cfg, variables)
    tool = photo.Anonymizer(os.path.join(tmp, "bundle"), keys.generate())
    inputs = os.path.join(tmp, "in")
    os.makedirs(inputs)
    paths, clip = write_inputs(inputs, photos, frames)
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    record = dict(config=config, device=bench.device_name(),
                  model_s_per_face=model["anonymize_s_per_img"])
    for name, job in (("photos", lambda: [files.anonymize_file(tool, p, os.path.join(
                          out, os.path.basename(p))) for p in paths]),
                      ("video", lambda: [video.anonymize_video(
                          tool, clip, os.path.join(out, "clip.mkv"), video.Options())])):
      for _ in range(rounds):
        start = time.perf_counter()
        results = job()
        seconds = time.perf_counter() - start
      if name == "photos":
        n = sum(r.faces for r in results)
        assert all(r.per_face and all(f["method"] == "g2face" for f in r.per_face)
                   for r in results), "every face of the photos goes through the generator"
      else:
        n = sum(frames for _ in range(results[0]["anonymized_tracks"]))
      record[f"{name}_faces"] = n
      record[f"{name}_s"] = seconds
      record[f"{name}_s_per_face"] = seconds / n
      record[f"{name}_ratio"] = seconds / n / record["model_s_per_face"]
  return record


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="paper")
  p.add_argument("--photos", type=positive_int, default=3)
  p.add_argument("--frames", type=positive_int, default=6)
  p.add_argument("--rounds", type=positive_int, default=2)
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  r = run(args.config, args.photos, args.frames, args.rounds)
  if args.json:
    print(json.dumps(r, indent=1))
    return 0
  print(f"{r['config']} on {r['device']}")
  print(f"model (g2face bench anonymize, batch 1): {r['model_s_per_face']:.3f} s/face")
  for name in ("photos", "video"):
    print(f"{name}: {r[name + '_faces']} faces in {r[name + '_s']:.2f} s = "
          f"{r[name + '_s_per_face']:.3f} s/face, {r[name + '_ratio']:.2f}x the model")
  return 0


if __name__ == "__main__":
  sys.exit(main())
