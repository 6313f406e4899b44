"""The small-face fallbacks (`obscure`): each changes the enlarged square and nothing
else; pixelate gives uniform blocks, fill one colour, blur less high-frequency energy."""
import math

import numpy as np
import pytest

from g2face_jax import obscure


def _photo(h=120, w=160, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _square(cx, cy, side, angle_deg=0.0):
  """(4, 2) TL, BL, BR, TR square of `side` centred at (cx, cy), rotated."""
  a = math.radians(angle_deg)
  x = np.array([math.cos(a), math.sin(a)]) * side / 2
  y = np.array([-x[1], x[0]])
  c = np.array([cx, cy], np.float64)
  return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


QUADS = [_square(60, 50, 40), _square(70, 60, 36, 30.0), _square(5, 110, 30, -20.0)]


def test_region_mask_is_the_enlarged_square_clipped():
  quad = _square(60, 50, 40)
  mask = obscure.region_mask(quad, (120, 160))
  side = 40 * (1 + obscure.GROW)  # 44: centres 38..82 in x, 28..72 in y
  ys, xs = np.nonzero(mask)
  assert xs.min() == math.ceil(60 - side / 2) and xs.max() == math.floor(60 + side / 2)
  assert ys.min() == math.ceil(50 - side / 2) and ys.max() == math.floor(50 + side / 2)
  assert mask.sum() == (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
  # clipped at the photo's edge, never wrapped
  edge = obscure.region_mask(_square(2, 2, 20), (120, 160))
  assert edge[0, 0] and not edge[-1, -1] and not edge[:, -1].any()
  assert not obscure.region_mask(_square(-100, -100, 20), (120, 160)).any()


@pytest.mark.parametrize("method", obscure.METHODS)
@pytest.mark.parametrize("quad", QUADS, ids=["upright", "rotated", "edge"])
def test_only_the_region_changes(method, quad):
  image = _photo()
  before = image.copy()
  out = obscure.apply(image, quad, method)
  np.testing.assert_array_equal(image, before)  # input untouched
  assert out.shape == image.shape and out.dtype == np.uint8
  mask = obscure.region_mask(quad, image.shape)
  np.testing.assert_array_equal(out[~mask], image[~mask])
  assert np.mean(np.any(out[mask] != image[mask], axis=-1)) > 0.9


def test_pixelate_blocks_are_uniform_and_coarse():
  image = _photo()
  quad = _square(60, 50, 40)
  out = obscure.pixelate(image, quad)
  mask = obscure.region_mask(quad, image.shape)
  ys, xs = np.nonzero(mask)
  step = math.ceil(40 * (1 + obscure.GROW) / obscure.PIXELATE_BLOCKS)
  blocks = {}
  for y, x in zip(ys, xs):
    blocks.setdefault(((y - ys.min()) // step, (x - xs.min()) // step), set()).add(
        tuple(out[y, x]))
  assert all(len(colours) == 1 for colours in blocks.values())
  assert len(blocks) <= (obscure.PIXELATE_BLOCKS + 1) ** 2
  # each block is its pixels' mean (the NumPy mean of the same pixels)
  (by, bx), _ = next(iter(blocks.items()))
  sel = [(y, x) for y, x in zip(ys, xs) if ((y - ys.min()) // step, (x - xs.min()) // step)
         == (by, bx)]
  mean = np.mean([image[y, x] for y, x in sel], axis=0)
  np.testing.assert_array_equal(out[sel[0]], np.round(mean).astype(np.uint8))


def test_fill_is_constant():
  image = _photo()
  quad = _square(70, 60, 36, 30.0)
  out = obscure.fill(image, quad)
  mask = obscure.region_mask(quad, image.shape)
  assert len(np.unique(out[mask], axis=0)) == 1
  np.testing.assert_array_equal(out[mask][0], np.round(image[mask].mean(axis=0)))


def _high_frequency_energy(patch):
  p = patch.astype(np.float64)
  return np.mean(np.diff(p, axis=0) ** 2) + np.mean(np.diff(p, axis=1) ** 2)


def test_blur_removes_high_frequencies_in_proportion_to_the_face():
  image = _photo()
  quad = _square(60, 50, 40)
  out = obscure.blur(image, quad)
  inner = (slice(36, 64), slice(46, 74))  # well inside the region
  assert _high_frequency_energy(out[inner]) < 0.01 * _high_frequency_energy(image[inner])
  # a flat photo stays flat (weights sum to one)
  flat = np.full((50, 60, 3), 77, np.uint8)
  np.testing.assert_array_equal(obscure.blur(flat, _square(30, 25, 20)), flat)
  # sigma follows the face: a smaller sigma keeps more detail
  weak = obscure.blur(image, quad, sigma=1.0)
  assert _high_frequency_energy(weak[inner]) > _high_frequency_energy(out[inner])


def test_blur_matches_a_separable_gaussian():
  """Independent reference: a direct 2-D Gaussian sum at one pixel."""
  image = _photo(60, 60, seed=3)
  quad = _square(30, 30, 20)
  sigma = 2.0
  out = obscure.blur(image, quad, sigma=sigma)
  y, x = 30, 31
  ys, xs = np.mgrid[0:60, 0:60]
  w = np.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * sigma ** 2))
  w *= (np.abs(ys - y) <= 3 * sigma) & (np.abs(xs - x) <= 3 * sigma)
  expected = np.tensordot(w / w.sum(), image.astype(np.float64), axes=([0, 1], [0, 1]))
  np.testing.assert_array_equal(out[y, x], np.round(expected).astype(np.uint8))


def test_unknown_method_and_bad_photo():
  with pytest.raises(ValueError, match="unknown obscuring method"):
    obscure.apply(_photo(), QUADS[0], "swirl")
  with pytest.raises(ValueError, match="uint8"):
    obscure.fill(_photo().astype(np.float32), QUADS[0])
