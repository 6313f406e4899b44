"""Fallbacks for faces the generator does not take: obscure a face's square in place.

Every function takes an (H, W, 3) uint8 RGB photo and a face's (4, 2) alignment
square (`faces.ffhq_quad`: TL, BL, BR, TR corners in photo pixel coordinates,
pixel centres) and returns a new (H, W, 3) uint8 photo. The obscured region is
the square enlarged by `GROW` about its centre, clipped to the photo
(`region_mask`); every pixel outside it is the input's, byte for byte.

- `pixelate`: the region cut into blocks of a side of 1/`PIXELATE_BLOCKS` of
  the enlarged square's side, each block one colour (its mean);
- `fill`: the whole region one colour (its mean);
- `blur`: a Gaussian blur of standard deviation `BLUR_SIGMA` times the
  square's side, so the strength follows the face's size.

Pure NumPy (no JAX): these run beside the model on the host.
"""
from __future__ import annotations

import math

import numpy as np

GROW = 0.1             # the region's side is (1 + GROW) times the alignment square's
PIXELATE_BLOCKS = 6    # blocks across the enlarged square: too coarse to recognise a face
BLUR_SIGMA = 0.15      # Gaussian sigma as a fraction of the square's side
METHODS = ("pixelate", "fill", "blur")
DEFAULT = "pixelate"   # the default small-face fallback (see `g2face anonymize --help`)


def side(quad: np.ndarray) -> float:
  """Side length (pixels) of a (4, 2) square."""
  quad = np.asarray(quad, np.float64)
  return float(np.linalg.norm(quad[3] - quad[0]))


def enlarge(quad: np.ndarray, grow: float = GROW) -> np.ndarray:
  """The (4, 2) square scaled by (1 + grow) about its centre."""
  quad = np.asarray(quad, np.float64)
  centre = quad.mean(axis=0)
  return centre + (quad - centre) * (1.0 + grow)


def _box(quad: np.ndarray, shape) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the pixel box (end-exclusive) that holds the quad, clipped."""
  h, w = shape[:2]
  x0, y0 = np.maximum(np.floor(quad.min(axis=0)).astype(int), 0)
  x1, y1 = np.minimum(np.ceil(quad.max(axis=0)).astype(int) + 1, [w, h])
  return int(x0), int(y0), int(max(x1, x0)), int(max(y1, y0))


def _inside(quad: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
  """(y1 - y0, x1 - x0) bool: pixel centres of the box inside the convex quad (edges in)."""
  ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
  inside = np.ones(xs.shape, bool)
  signs = []
  for i in range(4):
    (ax, ay), (bx, by) = quad[i], quad[(i + 1) % 4]
    signs.append((bx - ax) * (ys - ay) - (by - ay) * (xs - ax))
  signs = np.stack(signs)
  inside &= np.all(signs >= -1e-9, axis=0) | np.all(signs <= 1e-9, axis=0)
  return inside


def region_mask(quad: np.ndarray, shape, grow: float = GROW) -> np.ndarray:
  """(H, W) bool for a photo of `shape`: the pixels an obscuring function may change
  (pixel centres inside the square enlarged by `grow`)."""
  big = enlarge(quad, grow)
  mask = np.zeros(shape[:2], bool)
  x0, y0, x1, y1 = _box(big, shape)
  if x0 < x1 and y0 < y1:
    mask[y0:y1, x0:x1] = _inside(big, x0, y0, x1, y1)
  return mask


def _region(image: np.ndarray, quad: np.ndarray, grow: float):
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 photo, got {image.shape} {image.dtype}")
  big = enlarge(quad, grow)
  x0, y0, x1, y1 = _box(big, image.shape)
  if x0 >= x1 or y0 >= y1:
    return big, None, None
  return big, (x0, y0, x1, y1), _inside(big, x0, y0, x1, y1)


def fill(image: np.ndarray, quad: np.ndarray, grow: float = GROW) -> np.ndarray:
  """The region set to one colour: its own mean (rounded), which says nothing of the face."""
  _, box, inside = _region(image, quad, grow)
  out = np.array(image, np.uint8, copy=True)
  if box is None or not inside.any():
    return out
  x0, y0, x1, y1 = box
  patch = out[y0:y1, x0:x1]
  patch[inside] = np.round(patch[inside].astype(np.float64).mean(axis=0)).astype(np.uint8)
  return out


def pixelate(image: np.ndarray, quad: np.ndarray, blocks: int = PIXELATE_BLOCKS,
             grow: float = GROW) -> np.ndarray:
  """The region as square blocks of side ceil(region side / blocks) pixels on a grid from
  the region's top-left pixel; each block's pixels inside the region set to their mean."""
  big, box, inside = _region(image, quad, grow)
  out = np.array(image, np.uint8, copy=True)
  if box is None or not inside.any():
    return out
  x0, y0, x1, y1 = box
  step = max(1, math.ceil(side(big) / blocks))
  patch = out[y0:y1, x0:x1]
  h, w = inside.shape
  rows, cols = np.arange(h)[:, None] // step, np.arange(w)[None, :] // step
  label = (rows * (-(-w // step)) + cols)[inside]
  pixels = patch[inside].astype(np.float64)
  count = np.bincount(label)
  means = np.stack([np.bincount(label, pixels[:, c]) for c in range(3)], axis=1)
  means = np.round(means / np.maximum(count, 1)[:, None]).astype(np.uint8)
  patch[inside] = means[label]
  return out


def _gaussian_matrix(n_out: int, start: int, n_in: int, sigma: float) -> np.ndarray:
  """(n_out, n_in) rows of Gaussian weights (sigma pixels) for output positions
  start..start+n_out-1 over input positions 0..n_in-1, truncated at 3 sigma and
  normalised over the positions inside the photo."""
  out = np.arange(start, start + n_out, dtype=np.float64)[:, None]
  d = np.arange(n_in, dtype=np.float64)[None, :] - out
  weights = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= 3 * sigma)
  return weights / weights.sum(axis=1, keepdims=True)


def blur(image: np.ndarray, quad: np.ndarray, sigma: float | None = None,
         grow: float = GROW) -> np.ndarray:
  """The region replaced by a Gaussian blur of the photo (sigma pixels; default
  `BLUR_SIGMA` times the square's side), computed from the pixels within 3 sigma."""
  big, box, inside = _region(image, quad, grow)
  out = np.array(image, np.uint8, copy=True)
  if box is None or not inside.any():
    return out
  sigma = BLUR_SIGMA * side(quad) if sigma is None else float(sigma)
  if sigma <= 0:
    return out
  h, w = out.shape[:2]
  x0, y0, x1, y1 = box
  reach = math.ceil(3 * sigma)
  sx0, sy0 = max(x0 - reach, 0), max(y0 - reach, 0)
  sx1, sy1 = min(x1 + reach, w), min(y1 + reach, h)
  source = out[sy0:sy1, sx0:sx1].astype(np.float64)
  rows = _gaussian_matrix(y1 - y0, y0 - sy0, sy1 - sy0, sigma)  # (bh, sh)
  cols = _gaussian_matrix(x1 - x0, x0 - sx0, sx1 - sx0, sigma)  # (bw, sw)
  blurred = np.einsum("ij,jkc,lk->ilc", rows, source, cols, optimize=True)
  patch = out[y0:y1, x0:x1]
  patch[inside] = np.clip(np.round(blurred[inside]), 0, 255).astype(np.uint8)
  return out


def apply(image: np.ndarray, quad: np.ndarray, method: str) -> np.ndarray:
  """Obscure one face's square with `method` ('pixelate', 'fill' or 'blur'), defaults."""
  if method not in METHODS:
    raise ValueError(f"unknown obscuring method {method!r}; known: {', '.join(METHODS)}")
  return dict(pixelate=pixelate, fill=fill, blur=blur)[method](image, quad)
