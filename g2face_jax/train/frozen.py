"""The frozen networks of training (ArcFace, 3DMM regressor, LPIPS) and the BFM.

They come from the bundle of `pretrained.bundle` (see `pretrained`) when one is
given, else from a random initialisation (smoke and test runs: the losses run,
but identity and geometry then mean nothing), with a small random synthetic
face model for the BFM: a bumpy height-field mesh with random shape bases,
only for runs without the real `BFM_model_front.mat`.
"""
from __future__ import annotations

import jax
import ml_collections
import numpy as np

from g2face_jax import bundle, models
from g2face_jax.nn.bfm import BFM
from g2face_jax.train import pretrained as pretrained_lib
from g2face_jax.train.pretrained import FROZEN_NETS


def synthetic_bfm(seed: int = 0, grid: int = 12) -> BFM:
  """A random stand-in BFM: grid x grid vertices of a bumpy surface in [-1, 1]^2 (z in
  [0, 0.3]), two triangles per cell, N(0, 0.01) id / exp bases, 68 random keypoints."""
  rng = np.random.default_rng(seed)
  u = np.linspace(-1.0, 1.0, grid, dtype=np.float32)
  xx, yy = np.meshgrid(u, u)
  zz = 0.3 * (1 - xx ** 2) * (1 - yy ** 2) + 0.02 * rng.standard_normal(xx.shape)
  mean = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(np.float32)
  mean -= mean.mean(axis=0)
  n = mean.shape[0]
  idx = np.arange(n).reshape(grid, grid)
  a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
  faces = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)]).astype(np.int32)
  n_faces, k = faces.shape[0], 8
  point_buf = np.full((n, k), n_faces, np.int32)  # n_faces = the appended zero normal
  fill = np.zeros(n, np.int64)
  for f, tri in enumerate(faces):
    for v in tri:
      point_buf[v, fill[v]] = f
      fill[v] += 1
  return BFM(mean_shape=mean,
             id_base=(0.01 * rng.standard_normal((n, 3, 80))).astype(np.float32),
             exp_base=(0.01 * rng.standard_normal((n, 3, 64))).astype(np.float32),
             face_buf=faces, point_buf=point_buf,
             keypoints=rng.choice(n, 68, replace=False).astype(np.int32))


def bfm_of(config: ml_collections.ConfigDict, pretrained: bundle.Bundle | None = None) -> BFM:
  """The BFM of the run: the bundle's (`pretrained`, else opened from the config), or the
  synthetic stand-in when the config names no bundle."""
  pretrained = pretrained if pretrained is not None else pretrained_lib.open_bundle(config)
  if pretrained is not None:
    return pretrained.bfm
  return synthetic_bfm()


def random_variables(model: ml_collections.ConfigDict, name: str, seed: int) -> dict:
  """Random stand-in variables of a frozen network, drawn with NumPy from its abstract
  shapes (running Flax `init` on these deep nets costs minutes on a busy CPU): plain
  kernels U(+-1/sqrt(fan_in)) (PyTorch's default bound), biases 0, BatchNorm scale 1 and
  statistics (0, 1), PReLU slopes 0.25."""
  rng = np.random.default_rng(seed)
  module = models.build(model, name)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *models.example_inputs(model, name))

  def fill(path, leaf):
    last = getattr(path[-1], "key", str(path[-1]))
    if last == "kernel":
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      value = rng.uniform(-bound, bound, leaf.shape)
    else:
      value = np.full(leaf.shape, {"scale": 1.0, "var": 1.0, "slope": 0.25}.get(last, 0.0))
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def frozen_variables(config: ml_collections.ConfigDict, seed: int,
                     pretrained: bundle.Bundle | None = None) -> dict:
  """{'arcface', 'recon_net', 'lpips': variables, 'bfm': BFM} for the train step: the
  bundle's (`pretrained`, else opened from `config.pretrained.bundle`), or random
  stand-ins drawn from `seed` and the synthetic BFM when the config names no bundle."""
  pretrained = pretrained if pretrained is not None else pretrained_lib.open_bundle(config)
  if pretrained is not None:
    out = {name: pretrained.variables[name] for name in FROZEN_NETS}
  else:  # allowed by pretrained.allow_random, and said at the start (pretrained.preflight)
    out = {name: random_variables(config.model, name, seed + i)
           for i, name in enumerate(FROZEN_NETS)}
  out["bfm"] = bfm_of(config, pretrained)
  return out
