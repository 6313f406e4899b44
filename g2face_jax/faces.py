"""Faces of a photo: detection with 68-point landmarks, FFHQ-style alignment to a
square crop, feathered blend masks and paste-back (photos are read by `images`).

Detection is dlib's HOG frontal-face detector (built into dlib) with the
68-point shape predictor shipped by the `face-recognition-models` package,
on the CPU, with no download at run time. Alignment follows the FFHQ recipe:
an oriented square (`quad`) from the eye and mouth landmarks, warped to
(size, size). Coordinates are pixel centres (x right, y down), float64.
Photos are (H, W, 3) uint8 RGB; crops are (size, size, 3) float32 in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os

import cv2
import numpy as np

from g2face_jax import images

SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"
MIN_SCORE = 0.3  # dlib HOG detection score; lower scores were false positives in our photos
MIN_FACE = 64  # smallest alignment square side (photo pixels) that is anonymized
FEATHER = 0.1  # paste-back ramp width, as a fraction of the crop side


@dataclasses.dataclass(frozen=True)
class Face:
  quad: np.ndarray       # (4, 2) corners of the aligned square: top-left, bottom-left,
  #                        bottom-right, top-right, in photo pixel coordinates
  landmarks: np.ndarray  # (68, 2) dlib landmarks
  score: float           # detector score

  @property
  def side(self) -> float:
    """Side of the alignment square in photo pixels."""
    return float(np.linalg.norm(self.quad[3] - self.quad[0]))


@functools.lru_cache(maxsize=1)
def _models():
  import dlib  # imported here: only photo commands need it
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the face landmark model needs the `face-recognition-models` package")
  # the package's own __init__ needs pkg_resources; only its data file is used
  path = os.path.join(spec.submodule_search_locations[0], "models", SHAPE_PREDICTOR)
  return dlib.get_frontal_face_detector(), dlib.shape_predictor(path)


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
  """(68, 2) landmarks -> (4, 2) FFHQ alignment square (TL, BL, BR, TR)."""
  lm = np.asarray(landmarks, np.float64)
  eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
  eye_mid = (eye_left + eye_right) / 2
  eye_to_eye = eye_right - eye_left
  eye_to_mouth = (lm[48] + lm[54]) / 2 - eye_mid
  # x: the face's horizontal axis, the eye line tilted towards perpendicular to eye-to-mouth
  x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
  x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / np.hypot(*x)
  y = np.array([-x[1], x[0]])
  c = eye_mid + eye_to_mouth * 0.1
  return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def detect(image: np.ndarray, upsample: int = 1, min_score: float = MIN_SCORE) -> list[Face]:
  """Every frontal face of an (H, W, 3) uint8 photo, left to right."""
  detector, predictor = _models()
  image = np.ascontiguousarray(image)
  rects, scores, _ = detector.run(image, upsample, min_score)
  faces = []
  for rect, score in zip(rects, scores):
    shape = predictor(image, rect)
    lm = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
    faces.append(Face(ffhq_quad(lm), lm, float(score)))
  return sorted(faces, key=lambda f: f.quad[:, 0].mean())


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


def paste_back(image: np.ndarray, crop: np.ndarray, quad: np.ndarray,
               feather: float = FEATHER) -> tuple[np.ndarray, np.ndarray]:
  """Blend a (size, size, 3) crop in [-1, 1] back into the photo over its quad.

  Returns (new photo (H, W, 3) uint8, weight (H, W) float32 in [0, 1]). Pixels
  of weight 0 (everything outside the quad) are the input's, bit for bit.
  """
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
  weight = cv2.warpAffine(feather_mask(size, feather), to_crop, box,
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
