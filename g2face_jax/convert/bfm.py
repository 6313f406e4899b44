"""Basel Face Model files -> `nn.bfm.BFM`.

`load_mat` reads Deep3DFaceRecon's `BFM_model_front.mat` (MATLAB, 1-based
indices) the way the official `ParametricFaceModel` does: indices made 0-based,
the mean shape re-centred to a zero vertex mean. Only the fields that
`compute_for_loss` needs are read; texture and the training-only masks
(`frontmask2_idx`, `tri_mask2`, `skinmask`) may be present or not.
`save_npz` / `load_npz` keep the converted arrays, so run time needs no .mat parsing.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.io

from g2face_jax.convert.table import ConversionError
from g2face_jax.nn.bfm import BFM

NPZ_FIELDS = tuple(f.name for f in dataclasses.fields(BFM))
MAT_NAMES = {"mean_shape": "meanshape", "id_base": "idBase", "exp_base": "exBase",
             "face_buf": "tri", "point_buf": "point_buf", "keypoints": "keypoints"}  # BFM <- .mat
MAT_FIELDS = tuple(MAT_NAMES.values())
_INDEX_FIELDS = ("face_buf", "point_buf", "keypoints")


def _require(mapping, fields, path: str | os.PathLike) -> None:
  for name in fields:
    if name not in mapping:
      raise ConversionError(f"{os.fspath(path)}: not a BFM front model, missing field '{name}'")


def _checked(bfm: BFM, path: str | os.PathLike, names: dict | None = None) -> BFM:
  """Shape and index-range checks; errors name the file and its field (`names[field]`)."""
  n, f = bfm.mean_shape.shape[0], bfm.face_buf.shape[0]
  expect = {"mean_shape": (n, 3), "id_base": (n, 3, 80), "exp_base": (n, 3, 64),
            "face_buf": (f, 3), "point_buf": (n, bfm.point_buf.shape[-1]), "keypoints": (68,)}
  limit = {"face_buf": n, "point_buf": f + 1, "keypoints": n}  # 0-based, exclusive
  for name, shape in expect.items():
    value, where = getattr(bfm, name), f"{os.fspath(path)}: field '{(names or {}).get(name, name)}'"
    if value.shape != shape:
      raise ConversionError(f"{where} gives {name} of shape {value.shape}, expected {shape}")
    if name in limit and value.size and not 0 <= value.min() <= value.max() < limit[name]:
      raise ConversionError(f"{where} holds indices outside [0, {limit[name]}) once 0-based")
  return bfm


def load_mat(path: str | os.PathLike) -> BFM:
  """`BFM_model_front.mat` -> BFM (numpy arrays); ConversionError if it is not one."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{os.fspath(path)}: file not found")
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises several types for a file that is not MATLAB
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ConversionError(f"{os.fspath(path)}: not a readable MATLAB .mat file ({first})") from None
  _require(mat, MAT_FIELDS, path)

  def vertices(field: str) -> np.ndarray:  # (3N, K) interleaved xyz -> (N, 3, K)
    value = np.asarray(mat[field], np.float32)
    value = value.T if field == "meanshape" else value  # stored (1, 3N)
    if value.ndim != 2 or value.shape[0] % 3:
      raise ConversionError(f"{os.fspath(path)}: field '{field}' has shape {value.shape}, "
                            "expected (3N, K)")
    return value.reshape(-1, 3, value.shape[1])

  def indices(field: str) -> np.ndarray:  # 1-based MATLAB -> 0-based
    return (np.asarray(mat[field]).astype(np.int64) - 1).astype(np.int32)

  mean_shape = vertices("meanshape")[..., 0]
  return _checked(BFM(
      mean_shape=mean_shape - np.mean(mean_shape, axis=0, keepdims=True),
      id_base=vertices("idBase"),
      exp_base=vertices("exBase"),
      face_buf=indices("tri"),
      point_buf=indices("point_buf"),
      keypoints=indices("keypoints").reshape(-1),  # stored (1, 68)
  ), path, MAT_NAMES)


def save_npz(bfm: BFM, path: str | os.PathLike) -> None:
  """Write the converted arrays (field names of BFM) to an uncompressed .npz."""
  np.savez(path, **{name: np.asarray(getattr(bfm, name)) for name in NPZ_FIELDS})


def load_npz(path: str | os.PathLike) -> BFM:
  """.npz written by `save_npz` -> BFM (numpy arrays)."""
  with np.load(path, allow_pickle=False) as arrays:
    _require(arrays.files, NPZ_FIELDS, path)
    return _checked(BFM(**{
        name: arrays[name].astype(np.int32 if name in _INDEX_FIELDS else np.float32)
        for name in NPZ_FIELDS}), path)
