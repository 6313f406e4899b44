"""Image, identity and payload metrics, batched, in JAX.

Images are (B, H, W, 3) float32 in [-1, 1] unless stated; identities are
(B, D) embeddings. Every function returns per-sample values (B,) so that
callers can report means and distributions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DATA_RANGE = 2.0  # images in [-1, 1]


def mae(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error per image, in the [-1, 1] units of the official test (B,)."""
  return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


def psnr(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image (B,); inf for identical images."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def _box_mean(x: jax.Array, win: int) -> jax.Array:
  """Mean over each valid win x win window of (B, H, W, C) -> (B, H-win+1, W-win+1, C)."""
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win, win, 1), (1, 1, 1, 1), "VALID")
  return total / (win * win)


def ssim(x: jax.Array, y: jax.Array, data_range: float = DATA_RANGE, win: int = 7) -> jax.Array:
  """Structural similarity per image (B,), the mean over colour channels of the
  mean SSIM map (Wang et al. 2004 with a uniform win x win window, K1 0.01,
  K2 0.03, sample covariances with the N/(N-1) correction, valid windows only:
  the conventions of scikit-image's `structural_similarity` defaults)."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  n = win * win
  correction = n / (n - 1)
  mx, my = _box_mean(x, win), _box_mean(y, win)
  vx = correction * (_box_mean(x * x, win) - mx * mx)
  vy = correction * (_box_mean(y * y, win) - my * my)
  cxy = correction * (_box_mean(x * y, win) - mx * my)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Cosine similarity of matching rows of (B, D) and (B, D) -> (B,)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  return num / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def retrieval_hits(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray,
                   ks: tuple[int, ...] = (1, 5)) -> dict[int, np.ndarray]:
  """Identity retrieval by cosine similarity.

  queries (Q, D), gallery (G, D) embeddings; truth (Q,) index of each query's
  true match in the gallery. Returns {k: (Q,) bool}: whether the true match is
  among the k most similar gallery entries (ties ranked against the query).
  """
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-8)
  g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-8)
  sims = q @ g.T
  true_sim = sims[np.arange(len(truth)), truth]
  rank = np.sum(sims >= true_sim[:, None], axis=1)  # 1 = best; ties count against
  return {k: rank <= k for k in ks}


def bit_error_rate(bits: jax.Array, reference: jax.Array) -> jax.Array:
  """Share of differing bits per sample: (B, ...) {0,1} vs (B, ...) -> (B,)."""
  wrong = (jnp.asarray(bits) > 0.5) != (jnp.asarray(reference) > 0.5)
  return jnp.mean(wrong.reshape(wrong.shape[0], -1), axis=1)


def angle_error_degrees(angles: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean absolute difference of (B, 3) Euler angles in radians, in degrees, wrapped to
  [-180, 180) before taking the absolute value -> (B,)."""
  diff = jnp.degrees(angles - reference)
  return jnp.mean(jnp.abs((diff + 180.0) % 360.0 - 180.0), axis=-1)


def coefficient_error(coeff: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean squared difference of coefficient vectors (B, K) -> (B,)."""
  return jnp.mean(jnp.square(coeff - reference), axis=-1)


def landmark_error(landmarks: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean Euclidean distance of (B, 68, 2) landmarks in pixels -> (B,)."""
  return jnp.mean(jnp.linalg.norm(landmarks - reference, axis=-1), axis=-1)
