"""Basel Face Model 3DMM geometry used by the training losses (Deep3DFaceRecon's
`ParametricFaceModel.compute_for_loss`), as pure functions of arrays.

Coefficients (B, 257): id 0:80, exp 80:144, tex 144:224, angles 224:227
(radians), gamma 227:254 (SH lighting, 3 rows of 9), translation 254:257.
Conventions kept from the official code: rotation R = Rz Ry Rx acts on row
vectors as `points @ R^T`; the camera looks down -z from `camera_distance`
(z -> distance - z); pinhole projection with focal length and principal point
in pixels of the 224 crop, no y-flip.
"""
from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

ID, EXP, TEX = slice(0, 80), slice(80, 144), slice(144, 224)
ANGLES, GAMMA, TRANS = slice(224, 227), slice(227, 254), slice(254, 257)

CAMERA_DISTANCE, FOCAL, CENTER = 10.0, 1015.0, 112.0

# Weight of each SH band (a) times its normalisation (c).
_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_C = (1 / math.sqrt(4 * math.pi), math.sqrt(3.0) / math.sqrt(4 * math.pi),
      3 * math.sqrt(5.0) / math.sqrt(12 * math.pi))
_AMBIENT = 0.8  # added to SH coefficient 0 of every colour row of gamma

_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


@flax.struct.dataclass
class BFM:
  """The model arrays (a frozen pytree). N vertices, F triangles, all indices 0-based.

  mean_shape: (N, 3) float32, re-centred so the vertex mean is zero.
  id_base: (N, 3, 80), exp_base: (N, 3, 64) float32 shape bases.
  face_buf: (F, 3) int32 vertex indices of each triangle.
  point_buf: (N, K) int32 triangles around each vertex, in [0, F]; F (padding)
    selects the zero normal appended after the F triangle normals.
  keypoints: (68,) int32 vertex index of each landmark.
  """
  mean_shape: jax.Array
  id_base: jax.Array
  exp_base: jax.Array
  face_buf: jax.Array
  point_buf: jax.Array
  keypoints: jax.Array


def face_shape(bfm: BFM, id_coeff: jax.Array, exp_coeff: jax.Array) -> jax.Array:
  """id (B, 80), exp (B, 64) -> vertices (B, N, 3) in model space."""
  return (bfm.mean_shape + _einsum("nck,bk->bnc", bfm.id_base, id_coeff)
          + _einsum("nck,bk->bnc", bfm.exp_base, exp_coeff))


def rotation(angles: jax.Array) -> jax.Array:
  """Angles (B, 3) (x, y, z, radians) -> R = Rz Ry Rx (B, 3, 3); rotate points as `p @ R^T`."""
  c, s = jnp.cos(angles), jnp.sin(angles)
  one, zero = jnp.ones_like(c[:, 0]), jnp.zeros_like(c[:, 0])

  def matrix(*rows):
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)

  rot_x = matrix((one, zero, zero), (zero, c[:, 0], -s[:, 0]), (zero, s[:, 0], c[:, 0]))
  rot_y = matrix((c[:, 1], zero, s[:, 1]), (zero, one, zero), (-s[:, 1], zero, c[:, 1]))
  rot_z = matrix((c[:, 2], -s[:, 2], zero), (s[:, 2], c[:, 2], zero), (zero, zero, one))
  return _einsum("bij,bjk,bkl->bil", rot_z, rot_y, rot_x)


def rotate(points: jax.Array, rot: jax.Array) -> jax.Array:
  """points (B, N, 3), R (B, 3, 3) -> points @ R^T (B, N, 3)."""
  return _einsum("bnj,bij->bni", points, rot)


def to_camera(points: jax.Array, camera_distance: float = CAMERA_DISTANCE) -> jax.Array:
  """World (B, N, 3) -> camera space: z -> camera_distance - z."""
  return jnp.concatenate([points[..., :2], camera_distance - points[..., 2:]], axis=-1)


def project(points: jax.Array, focal: float = FOCAL, center: float = CENTER) -> jax.Array:
  """Camera-space points (B, N, 3) -> pixels (B, N, 2): (f x + c z) / z, (f y + c z) / z."""
  z = points[..., 2:]
  return (focal * points[..., :2] + center * z) / z


def _normalize(v: jax.Array) -> jax.Array:
  """v / max(|v|, 1e-12) over the last axis (PyTorch `F.normalize`); zero stays zero,
  with finite gradients."""
  return v / jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))


def vertex_normals(bfm: BFM, shape: jax.Array) -> jax.Array:
  """Vertices (B, N, 3) -> unit vertex normals (B, N, 3); zero for a vertex in no triangle."""
  v1, v2, v3 = (shape[:, bfm.face_buf[:, i]] for i in range(3))
  face_normal = _normalize(jnp.cross(v1 - v2, v2 - v3))
  face_normal = jnp.concatenate([face_normal, jnp.zeros_like(face_normal[:, :1])], axis=1)
  return _normalize(jnp.sum(face_normal[:, bfm.point_buf], axis=2))


def sh_lighting(normals: jax.Array, gamma: jax.Array) -> jax.Array:
  """Rotated unit normals (B, N, 3), gamma (B, 27) -> SH irradiance (B, N, 3) per RGB channel.

  gamma holds one row of 9 SH coefficients per colour channel; 0.8 is added to
  coefficient 0 of each row. Not multiplied by any texture.
  """
  x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
  a, c = _A, _C
  basis = jnp.stack([
      a[0] * c[0] * jnp.ones_like(x),
      -a[1] * c[1] * y,
      a[1] * c[1] * z,
      -a[1] * c[1] * x,
      a[2] * c[2] * x * y,
      -a[2] * c[2] * y * z,
      0.5 * a[2] * c[2] / math.sqrt(3.0) * (3 * z**2 - 1),
      -a[2] * c[2] * x * z,
      0.5 * a[2] * c[2] * (x**2 - y**2),
  ], axis=-1)
  gamma = jnp.asarray(gamma).reshape(-1, 3, 9).at[:, :, 0].add(_AMBIENT)
  return _einsum("bnk,bck->bnc", basis, gamma)


def landmarks(bfm: BFM, pixels: jax.Array) -> jax.Array:
  """Projected vertices (B, N, 2) -> the 68 landmarks (B, 68, 2)."""
  return pixels[:, bfm.keypoints]


def compute_for_loss(bfm: BFM, coeffs: jax.Array, camera_distance: float = CAMERA_DISTANCE,
                     focal: float = FOCAL, center: float = CENTER):
  """coeffs (B, 257) -> (face_shape (B, N, 3), landmark (B, 68, 2) pixels, color (B, N, 3)).

  face_shape is untransformed (model space); rotation, translation and camera
  act only on the landmarks and on the normals that the SH lighting `color` sees.
  """
  shape = face_shape(bfm, coeffs[:, ID], coeffs[:, EXP])
  rot = rotation(coeffs[:, ANGLES])
  posed = rotate(shape, rot) + coeffs[:, None, TRANS]
  landmark = landmarks(bfm, project(to_camera(posed, camera_distance), focal, center))
  color = sh_lighting(rotate(vertex_normals(bfm, shape), rot), coeffs[:, GAMMA])
  return shape, landmark, color
