"""Frechet Inception Distance: pool3 features of the FID InceptionV3 and the
Frechet distance between the Gaussians fitted to two feature sets.

    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2))

with sample means mu and covariances S (N - 1 normalisation), as pytorch-fid
computes it. With fewer images than feature dimensions the covariances are
singular; when the square root is then not finite, eps * I is added to both
(the usual remedy), and a complex result is accepted as real only while its
imaginary part is numerical noise.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from g2face_jax import bundle
from g2face_jax.nn import inception

BATCH_SIZE = 16
SQRTM_EPS = 1e-6
IMAGINARY_TOLERANCE = 1e-3  # largest |imaginary part| on the diagonal of sqrtm accepted as noise


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features, N >= 2 -> mean (D,) and sample covariance (D, D), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"FID needs at least 2 feature vectors (N, D), got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings():  # singular products are expected; judged by the result below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = SQRTM_EPS) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D)."""
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched statistics: means {mu1.shape} / {mu2.shape}, "
                     f"covariances {sigma1.shape} / {sigma2.shape}")
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = eps * np.eye(len(mu1))
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    largest = np.max(np.abs(np.diagonal(covmean).imag))
    if largest > IMAGINARY_TOLERANCE:
      raise ValueError("the square root of the covariance product has an imaginary part of "
                       f"{largest:.3g}")
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two (N, D) feature sets (N >= 2 each; the counts may differ)."""
  return frechet_distance(*statistics(features1), *statistics(features2))


class InceptionFeatures:
  """Pool3 features of images with converted FID InceptionV3 variables, batch by batch.

  __call__: images (N, H, W, 3) uint8 in [0, 255] or float in [0, 1] -> (N, 2048)
  float32. Batches hold min(batch_size, N) images, the last one padded, so one
  compilation serves every batch of a call (and every call with as many images).
  """

  def __init__(self, variables: dict, batch_size: int = BATCH_SIZE):
    self.variables = variables
    self.batch_size = batch_size
    self._apply: Callable = jax.jit(inception.FIDInceptionV3().apply)

  def __call__(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    size, out = min(self.batch_size, len(images)), []
    for start in range(0, len(images), size):
      batch = images[start:start + size].astype(np.float32)
      pad = size - len(batch)
      padded = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.float32)])
      out.append(np.asarray(self._apply(self.variables, jnp.asarray(padded)))[:len(batch)])
    return np.concatenate(out) if out else np.zeros((0, inception.FEATURES), np.float32)


def features_from_bundle(path: str, batch_size: int = BATCH_SIZE) -> InceptionFeatures:
  """InceptionFeatures of the network 'inception' of a bundle (`g2face convert --inception
  FILE`); a one-line BundleError when the folder is not a bundle or holds no FID InceptionV3."""
  b = bundle.load(path)
  b.require("inception", purpose="compute FID")
  return InceptionFeatures(b.variables["inception"], batch_size)
