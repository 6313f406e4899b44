"""Faces: detection on real bundled faces, FFHQ alignment, face masks, paste-back."""
import os

import cv2
import numpy as np
import pytest

from g2face_jax import detection, faces, images

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GROUP = os.path.join(DATA, "group_photo.jpg")  # astronaut (x < 320) and Grace Hopper (x >= 320)


@pytest.fixture(scope="module")
def photo():
  return images.read(GROUP)


@pytest.fixture(scope="module")
def found(photo):
  return faces.detect(photo)


def test_detects_both_real_faces_left_to_right(photo, found):
  assert photo.shape == (320, 640, 3)
  assert len(found) == 2
  astronaut, hopper = found
  assert astronaut.landmarks.shape == (5, 2) and astronaut.score > detection.THRESHOLD
  for face, (lo, hi) in zip(found, [(0, 320), (320, 640)]):
    eyes = face.landmarks[0:2].mean(axis=0)
    mouth = face.landmarks[3:5].mean(axis=0)
    left_eye, right_eye = face.landmarks[0], face.landmarks[1]
    assert lo < eyes[0] < hi and lo < mouth[0] < hi
    assert mouth[1] - eyes[1] > 20  # mouth below the eyes
    assert right_eye[0] - left_eye[0] > 20  # image-left eye first
    assert face.side > faces.MIN_FACE
  assert hopper.side > astronaut.side  # Grace Hopper's face is the larger one
  assert all(f.profile < 0.3 for f in found)  # both look at the camera


def test_landmarks_agree_with_dlibs_68_point_model(photo, found):
  """CenterFace's five points against dlib's (eye contour means, nose tip, mouth corners):
  within 6% of the alignment square's side (measured: at most 3.5%)."""
  hog = faces.detect_hog(photo)
  assert len(hog) == len(found) == 2
  for ours, theirs in zip(found, hog):
    error = np.linalg.norm(ours.landmarks - theirs.landmarks, axis=1).max()
    assert error < 0.06 * theirs.side


def test_five_points_of_dlibs_68():
  lm = np.random.default_rng(1).normal(size=(68, 2))
  five = faces.five_points(lm)
  np.testing.assert_allclose(five, [lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48],
                                    lm[54]])
  np.testing.assert_allclose(faces.ffhq_quad(five), faces.ffhq_quad(lm), atol=1e-12)


def test_profile_grows_as_the_nose_moves_past_an_eye():
  lm = np.array([[90.0, 100], [110, 100], [100, 115], [93, 130], [107, 130]])
  assert faces.profile(lm) == pytest.approx(0.0)
  for shift, expected in ((5, 0.5), (10, 1.0), (-15, 1.5)):
    turned = lm.copy()
    turned[2, 0] += shift
    angle = np.deg2rad(40)  # in-plane rotation does not change it
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    assert faces.profile(turned @ rot.T) == pytest.approx(expected)


def test_ffhq_quad_of_an_upright_face():
  lm = np.zeros((68, 2))
  lm[36:42] = (90, 100)
  lm[42:48] = (110, 100)
  lm[48], lm[54] = (95, 130), (105, 130)
  # eye-to-eye 20, eye-to-mouth 30: half side = max(2 * 20, 1.8 * 30) = 54, centre (100, 103)
  expected = np.array([[46, 49], [46, 157], [154, 157], [154, 49]], np.float64)
  np.testing.assert_allclose(faces.ffhq_quad(lm), expected, atol=1e-12)


def test_ffhq_quad_follows_rotation():
  lm = np.random.default_rng(0).normal(size=(68, 2)) * 5 + 100
  lm[36:42] += (-10, 0)
  lm[42:48] += (10, 0)
  lm[48:55] += (0, 30)
  angle = np.deg2rad(25)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  quad = faces.ffhq_quad(lm)
  np.testing.assert_allclose(faces.ffhq_quad(lm @ rot.T), quad @ rot.T, atol=1e-9)


def test_crop_corners_map_to_the_quad():
  quad = np.array([[10.0, 20.0], [5.0, 120.0], [105.0, 125.0], [110.0, 25.0]])
  affine = faces.crop_to_photo(quad, 64)
  corners = np.array([[-0.5, -0.5, 1], [-0.5, 63.5, 1], [63.5, 63.5, 1], [63.5, -0.5, 1]])
  np.testing.assert_allclose(corners @ affine.T, quad, atol=1e-12)


def test_align_samples_the_photo_at_the_quad():
  """A linear ramp image: the crop must hold the ramp's value at each mapped point."""
  h, w = 200, 300
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  image = np.stack([xx * 0.5, yy * 0.8, (xx + yy) * 0.3], -1).round().astype(np.uint8)
  quad = np.array([[60.0, 40.0], [60.0, 140.0], [160.0, 140.0], [160.0, 40.0]])
  crop = faces.align(image, quad, 50)
  affine = faces.crop_to_photo(quad, 50)
  u, v = np.meshgrid(np.arange(50.0), np.arange(50.0))
  px = affine[0, 0] * u + affine[0, 1] * v + affine[0, 2]
  py = affine[1, 0] * u + affine[1, 1] * v + affine[1, 2]
  expected = np.stack([px * 0.5, py * 0.8, (px + py) * 0.3], -1) / 127.5 - 1
  # image values are rounded (<= 0.5 level) and area averaging of a ramp is exact
  np.testing.assert_allclose(crop, expected, atol=1.0 / 127.5)


def _psnr(a, b, where):
  err = (a.astype(np.float64) - b)[where]
  return 10 * np.log10(255.0 ** 2 / np.mean(err ** 2))


def test_align_then_paste_back_of_unchanged_crops_keeps_the_photo(photo, found):
  """Crop sizes at least the face's side (no down-sampling): PSNR above 35 dB.

  Measured: astronaut at 256 38.7 dB, Grace Hopper at 512 36.9 dB.
  """
  for face, size in zip(found, (256, 512)):
    assert size >= face.side
    out, weight = faces.paste_back(photo, faces.align(photo, face.quad, size), face.quad)
    assert _psnr(out, photo, weight > 0) > 35
    np.testing.assert_array_equal(out[weight == 0], photo[weight == 0])


def _polygon_mask(quad, shape, grow=2):
  mask = np.zeros(shape, np.uint8)
  cv2.fillPoly(mask, [np.round(quad).astype(np.int32)], 1)
  return cv2.dilate(mask, np.ones((2 * grow + 1,) * 2, np.uint8)) > 0


@pytest.mark.parametrize("mask", faces.MASKS)
def test_pixels_outside_the_face_squares_are_exactly_unchanged(photo, found, mask):
  out = photo
  weights = np.zeros(photo.shape[:2], np.float32)
  for face in found:
    crop = -faces.align(out, face.quad, 32)  # an obviously different face
    out, weight = faces.paste_back(out, crop, face.quad, mask)
    weights = np.maximum(weights, weight)
    assert weight.max() == 1.0 and weight.min() == 0.0
  changed = np.any(out != photo, axis=-1)
  inside = np.zeros(photo.shape[:2], bool)
  for face in found:
    inside |= _polygon_mask(face.quad, photo.shape[:2])
  assert changed.sum() > (0.7 if mask == "square" else 0.4) * inside.sum()
  assert not np.any(changed & ~inside)
  assert not np.any(changed & (weights == 0))


def test_face_mask_covers_the_features_and_spares_the_corners():
  """The aligned positions of a face's landmarks (through `ffhq_quad` and the crop map)
  are fully blended; the crop's corners and edges are not touched."""
  size = 64
  lm = np.array([[90.0, 100], [110, 100], [100, 112], [92, 124], [108, 124]])
  to_crop = cv2.invertAffineTransform(faces.crop_to_photo(faces.ffhq_quad(lm), size))
  uv = lm @ to_crop[:, :2].T + to_crop[:, 2]
  m = faces.face_mask(size)
  for u, v in np.round(uv).astype(int):
    assert m[v, u] == 1.0
  assert m[0, 0] == m[0, -1] == m[-1, 0] == m[-1, -1] == 0
  assert np.all(m[0] == 0) and np.all(m[:, 0] == 0) and np.all(m[:, -1] == 0)
  assert np.all(m <= faces.feather_mask(size))
  np.testing.assert_array_equal(m, m[:, ::-1])  # left-right symmetric
  assert 0.3 < m.mean() < 0.6  # a face, not the square


def test_paste_back_refuses_an_unknown_mask(photo, found):
  with pytest.raises(ValueError, match="unknown paste mask"):
    faces.paste_back(photo, faces.align(photo, found[0].quad, 32), found[0].quad, "circle")


def test_feather_mask_ramps_to_zero_at_the_border():
  m = faces.feather_mask(40, 0.1)
  assert m[20, 20] == 1 and m[0, 20] == 0 and m[1, 20] == pytest.approx(1 / 4)
  np.testing.assert_array_equal(m, m.T)
  np.testing.assert_array_equal(m, m[::-1])


def test_no_face_in_a_plain_image():
  image = np.full((120, 160, 3), 128, np.uint8)
  assert faces.detect(image) == []
