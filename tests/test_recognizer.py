"""The independent recognizer on real face photos (scikit-image's LFW crops)."""
import numpy as np
import pytest
from skimage import data

from g2face_jax.eval import recognizer


@pytest.fixture(scope="module")
def lfw():
  """(N, 25, 25) grey crops of LFW faces; upscaled to RGB 100x100 for dlib."""
  faces = data.lfw_subset()[:6]
  grey = np.round(faces * 255).astype(np.uint8)
  big = np.repeat(np.repeat(grey, 4, axis=1), 4, axis=2)
  return np.stack([big] * 3, axis=-1)


def test_a_face_is_itself_and_descriptors_are_unit_scale(lfw):
  d = recognizer.descriptor(lfw[0])
  assert d.shape == (128,) and 0.5 < np.linalg.norm(d) < 1.5
  distance, same = recognizer.same_person(d, recognizer.descriptor(lfw[0]))
  assert distance < 1e-5 and same


def test_different_faces_are_farther_than_a_face_and_its_mirror(lfw):
  d = [recognizer.descriptor(f) for f in lfw]
  mirror = recognizer.descriptor(lfw[0][:, ::-1])
  own = recognizer.same_person(d[0], mirror)[0]
  others = [recognizer.same_person(d[0], e)[0] for e in d[1:]]
  assert own < min(others)

