"""BFM 3DMM geometry (`compute_for_loss`) against the official fixture, and its file formats."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from conftest import FIXTURES, rel_err
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn import bfm

MAT = os.path.join(FIXTURES, "bfm_small", "BFM_model_front.mat")
OUTPUTS = ("face_shape", "landmark", "color")

compute_for_loss = jax.jit(bfm.compute_for_loss)


@pytest.fixture(scope="module")
def model():
  return convert_bfm.load_mat(MAT)


@pytest.fixture(scope="module")
def fixture():
  with np.load(os.path.join(FIXTURES, "bfm_geometry.npz")) as f:
    return dict(f)


@pytest.fixture(scope="module")
def outputs(model, fixture):
  return dict(zip(OUTPUTS, compute_for_loss(model, fixture["coeffs"])))


@pytest.mark.parametrize("name", OUTPUTS)
def test_parity(outputs, fixture, name):
  err = rel_err(outputs[name], fixture[name])
  print(f"{name}: rel_err {err:.2e}")
  assert err <= 1e-4


def test_finite_values_and_gradients(model, outputs, fixture):
  for name, value in outputs.items():
    assert np.isfinite(np.asarray(value)).all(), name
  grad = jax.jit(jax.grad(lambda c: sum(jnp.sum(o) for o in bfm.compute_for_loss(model, c))))(
      jnp.asarray(fixture["coeffs"]))
  assert np.isfinite(np.asarray(grad)).all()


def test_vertex_in_no_triangle_gets_zero_normal():
  # Two triangles in the z=0 plane sharing an edge; vertex 4 belongs to none.
  pad = 2
  tiny = bfm.BFM(
      mean_shape=np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [5, 5, 5]], np.float32),
      id_base=np.zeros((5, 3, 80), np.float32), exp_base=np.zeros((5, 3, 64), np.float32),
      face_buf=np.array([[0, 2, 1], [1, 2, 3]], np.int32),
      point_buf=np.array([[0, pad], [0, 1], [0, 1], [1, pad], [pad, pad]], np.int32),
      keypoints=np.zeros((68,), np.int32))
  shape = bfm.face_shape(tiny, jnp.zeros((1, 80)), jnp.zeros((1, 64)))
  normals = np.asarray(bfm.vertex_normals(tiny, shape))[0]
  np.testing.assert_allclose(np.abs(normals[:4, 2]), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(normals[4], 0.0)
  grad = jax.grad(lambda s: jnp.sum(bfm.vertex_normals(tiny, s)))(shape)
  assert np.isfinite(np.asarray(grad)).all()


def test_loader_conventions(model):
  assert np.abs(np.mean(model.mean_shape, axis=0)).max() <= 1e-4 * np.abs(model.mean_shape).max()
  assert model.point_buf.min() >= 0 and model.point_buf.max() <= model.face_buf.shape[0]
  assert model.face_buf.min() >= 0 and model.keypoints.shape == (68,)


def test_npz_round_trip(model, outputs, fixture, tmp_path):
  path = tmp_path / "bfm.npz"
  convert_bfm.save_npz(model, path)
  loaded = convert_bfm.load_npz(path)
  for name in convert_bfm.NPZ_FIELDS:
    ours, ref = getattr(loaded, name), getattr(model, name)
    assert ours.dtype == ref.dtype and np.array_equal(ours, ref), name
  for name, value in zip(OUTPUTS, compute_for_loss(loaded, fixture["coeffs"])):
    np.testing.assert_array_equal(np.asarray(value), np.asarray(outputs[name]))


def _error_message(load, path):
  with pytest.raises(ConversionError) as info:
    load(path)
  message = str(info.value)
  assert "\n" not in message and os.fspath(path) in message
  return message


@pytest.mark.parametrize("field", convert_bfm.MAT_FIELDS)
def test_mat_missing_field(tmp_path, field):
  mat = {k: v for k, v in scipy.io.loadmat(MAT).items() if not k.startswith("__")}
  del mat[field]
  path = tmp_path / "not_bfm.mat"
  scipy.io.savemat(path, mat)
  assert f"'{field}'" in _error_message(convert_bfm.load_mat, path)


def test_mat_misshapen_field(tmp_path):
  mat = {k: v for k, v in scipy.io.loadmat(MAT).items() if not k.startswith("__")}
  mat["exBase"] = mat["exBase"][:, :10]
  path = tmp_path / "bad_shape.mat"
  scipy.io.savemat(path, mat)
  assert "'exBase'" in _error_message(convert_bfm.load_mat, path)


def test_mat_index_out_of_range(tmp_path):
  mat = {k: v for k, v in scipy.io.loadmat(MAT).items() if not k.startswith("__")}
  mat["tri"] = np.where(mat["tri"] == mat["tri"].max(), mat["meanshape"].size // 3 + 1, mat["tri"])
  path = tmp_path / "bad_index.mat"
  scipy.io.savemat(path, mat)
  assert "'tri'" in _error_message(convert_bfm.load_mat, path)


def test_npz_missing_field(model, tmp_path):
  path = tmp_path / "partial.npz"
  np.savez(path, **{n: getattr(model, n) for n in convert_bfm.NPZ_FIELDS if n != "point_buf"})
  assert "'point_buf'" in _error_message(convert_bfm.load_npz, path)


def test_mat_meanshape_not_xyz(tmp_path):
  mat = {k: v for k, v in scipy.io.loadmat(MAT).items() if not k.startswith("__")}
  mat["meanshape"] = mat["meanshape"][:, :-1]
  path = tmp_path / "bad_mean.mat"
  scipy.io.savemat(path, mat)
  assert "'meanshape'" in _error_message(convert_bfm.load_mat, path)
