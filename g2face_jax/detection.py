"""Face detection with CenterFace on the JAX device: boxes, five landmarks, scores.

CenterFace (`nn.centerface`, weights shipped in `g2face_jax.weights`) maps an
RGB photo (pixel values 0..255, sides padded to multiples of 32) to maps at a
quarter of its resolution: a face-centre heatmap (scores in [0, 1]), the log
box size, the sub-cell centre offset and five landmarks relative to the box.
`decode` turns the cells above `threshold` into faces on the host and keeps
the best of overlapping boxes (non-maximum suppression at IoU `NMS_IOU`).

Landmarks are (5, 2) pixel coordinates (x right, y down) in the order
LANDMARKS: the eyes, the nose tip and the mouth corners, the image-left one
of each pair first for an upright face.

Photos of one padded size share one compiled program; `Detector.__call__`
runs the photos of one padded size (e.g. video frames) as one batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from g2face_jax import weights
from g2face_jax.nn import centerface


LANDMARKS = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")
THRESHOLD = 0.3   # heatmap score from which a cell is a face (`--threshold`)
NMS_IOU = 0.3     # boxes overlapping a better one by this IoU or more are dropped
STRIDE = 4        # photo pixels per cell of the output maps
MULTIPLE = 32     # the network's input sides are multiples of this


@dataclasses.dataclass(frozen=True)
class Detection:
  box: np.ndarray        # (4,) x0, y0, x1, y1 in photo pixels
  landmarks: np.ndarray  # (5, 2) in the order of LANDMARKS
  score: float           # heatmap score in [0, 1]


def padded_shape(height: int, width: int) -> tuple[int, int]:
  """The network's input (H, W) for a photo: each side rounded up to a multiple of 32."""
  return (-(-height // MULTIPLE) * MULTIPLE, -(-width // MULTIPLE) * MULTIPLE)


@jax.jit
def _run(variables, x):
  with jax.default_matmul_precision("highest"):
    return centerface.CenterFace().apply(variables, x.astype(jnp.float32))


@functools.lru_cache(maxsize=1)
def _variables():
  """The shipped weights on the default device (read on first use)."""
  return jax.device_put(weights.load_centerface())


def network_outputs(batch: np.ndarray) -> dict[str, np.ndarray]:
  """(B, H, W, 3) uint8 or float photos (sides multiples of 32) -> CenterFace's maps on
  the host: heatmap (B, H/4, W/4), scale and offset (B, H/4, W/4, 2), landmarks
  (B, H/4, W/4, 10)."""
  out = _run(_variables(), jnp.asarray(batch))
  return {k: np.asarray(v) for k, v in out.items()}


def decode(maps: dict[str, np.ndarray], height: int, width: int,
           threshold: float = THRESHOLD) -> list[Detection]:
  """One photo's maps (no batch axis) -> its faces, best score first.

  A cell (i, j) above `threshold` is a face of height exp(scale[0]) * 4 and width
  exp(scale[1]) * 4 centred at ((j + offset[1] + 0.5) * 4, (i + offset[0] + 0.5) * 4);
  landmark k is the box's top-left corner plus (landmarks[2k + 1] * width,
  landmarks[2k] * height). Boxes are clipped to the (height, width) photo; cells of
  the padding are ignored.
  """
  rows, cols = -(-height // STRIDE), -(-width // STRIDE)
  heat = maps["heatmap"][:rows, :cols]
  i, j = np.nonzero(heat > threshold)
  if i.size == 0:
    return []
  scores = heat[i, j].astype(np.float64)
  size = np.exp(maps["scale"][i, j].astype(np.float64)) * STRIDE        # (n, 2): h, w
  offset = maps["offset"][i, j].astype(np.float64)                     # (n, 2): dy, dx
  centre = np.stack([j + offset[:, 1], i + offset[:, 0]], axis=1) * STRIDE + STRIDE / 2
  top_left = centre - size[:, ::-1] / 2
  rel = maps["landmarks"][i, j].astype(np.float64).reshape(-1, 5, 2)[:, :, ::-1]  # (x, y)
  landmarks = top_left[:, None, :] + rel * size[:, None, ::-1]
  boxes = np.concatenate([top_left, top_left + size[:, ::-1]], axis=1)
  boxes = np.clip(boxes, 0, [width, height, width, height])
  keep = cv2.dnn.NMSBoxes([(b[0], b[1], b[2] - b[0], b[3] - b[1]) for b in boxes],
                          scores.tolist(), threshold, NMS_IOU)
  keep = sorted(np.asarray(keep, int).ravel(), key=lambda k: -scores[k])
  return [Detection(boxes[k], landmarks[k], float(scores[k])) for k in keep]


class Detector:
  """CenterFace on the default JAX device with a score `threshold`."""

  def __init__(self, threshold: float = THRESHOLD):
    if not 0.0 < threshold < 1.0:
      raise ValueError(f"the detection threshold must be in (0, 1), got {threshold}")
    self.threshold = float(threshold)

  def __call__(self, photos: Sequence[np.ndarray]) -> list[list[Detection]]:
    """(H, W, 3) uint8 RGB photos -> each photo's faces, best score first. Photos of one
    padded shape run as one batch (zero-padded at the bottom and right, as each would
    be alone), so a photo's faces do not depend on the photos beside it."""
    groups: dict[tuple[int, int], list[int]] = {}
    for k, p in enumerate(photos):
      groups.setdefault(padded_shape(*p.shape[:2]), []).append(k)
    found: list[list[Detection]] = [[] for _ in photos]
    for (ph, pw), members in groups.items():
      batch = np.zeros((len(members), ph, pw, 3), np.uint8)
      for row, k in enumerate(members):
        batch[row, :photos[k].shape[0], :photos[k].shape[1]] = photos[k]
      maps = network_outputs(batch)
      for row, k in enumerate(members):
        h, w = photos[k].shape[:2]
        found[k] = decode({n: m[row] for n, m in maps.items()}, h, w, self.threshold)
    return found
