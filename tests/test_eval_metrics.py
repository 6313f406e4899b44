"""Evaluation metrics against independent references: scikit-image for PSNR and
SSIM, NumPy for the rest, hand-computed cases for retrieval and bit error rate."""
import numpy as np
import pytest
from skimage import metrics as skimage_metrics

from g2face_jax.eval import metrics


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (3, 40, 48, 3)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  y[2] = np.clip(0.5 * x[2] + 0.1, -1, 1)  # a contrast change, not only noise
  return x, y


def test_psnr_matches_scikit_image(images):
  x, y = images
  ours = np.asarray(metrics.psnr(x, y))
  ref = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in zip(x, y)]
  np.testing.assert_allclose(ours, ref, rtol=1e-5)
  assert np.isinf(metrics.psnr(x[:1], x[:1])[0])


def test_ssim_matches_scikit_image(images):
  x, y = images
  ours = np.asarray(metrics.ssim(x, y))
  ref = [skimage_metrics.structural_similarity(a, b, data_range=2.0, channel_axis=-1)
         for a, b in zip(x.astype(np.float64), y.astype(np.float64))]
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, rtol=1e-6)


def test_mae_and_cosine_match_numpy(images):
  x, y = images
  np.testing.assert_allclose(metrics.mae(x, y), np.abs(x - y).mean(axis=(1, 2, 3)), rtol=1e-6)
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 512)), rng.normal(size=(4, 512))
  ref = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  np.testing.assert_allclose(metrics.cosine(a, b), ref, rtol=1e-5, atol=1e-6)


def test_retrieval_by_hand():
  gallery = np.array([[1, 0], [0, 1], [-1, 0], [0.7, 0.7]], np.float32)
  queries = np.array([[1, 0.1],     # nearest gallery 0 (its truth): top-1
                      [0.9, 1.0],   # truth 1, but 3 is nearer, then 1: top-2
                      [-1, -0.1],   # truth 2: top-1
                      [0, -1]],     # truth 3 is the farthest: rank 4
                     np.float32)
  hits = metrics.retrieval_hits(queries, gallery, np.array([0, 1, 2, 3]), ks=(1, 2, 5))
  np.testing.assert_array_equal(hits[1], [True, False, True, False])
  np.testing.assert_array_equal(hits[2], [True, True, True, False])
  np.testing.assert_array_equal(hits[5], [True, True, True, True])


def test_bit_error_rate_by_hand():
  ref = np.zeros((2, 4, 8))
  bits = ref.copy()
  bits[0, 0, :3] = 1          # 3 of 32 wrong
  bits[1] = 1                 # all wrong
  np.testing.assert_allclose(metrics.bit_error_rate(bits, ref), [3 / 32, 1.0])


def test_angle_error_wraps_around():
  a = np.radians(np.array([[179.0, 0, 10]]))
  b = np.radians(np.array([[-179.0, 0, 4]]))
  np.testing.assert_allclose(metrics.angle_error_degrees(a, b), [(2 + 0 + 6) / 3], rtol=1e-4)


def test_landmark_and_coefficient_errors_match_numpy():
  rng = np.random.default_rng(1)
  p, q = rng.normal(size=(2, 68, 2)), rng.normal(size=(2, 68, 2))
  np.testing.assert_allclose(metrics.landmark_error(p, q),
                             np.linalg.norm(p - q, axis=-1).mean(-1), rtol=1e-5)
  c, d = rng.normal(size=(2, 64)), rng.normal(size=(2, 64))
  np.testing.assert_allclose(metrics.coefficient_error(c, d), ((c - d) ** 2).mean(-1), rtol=1e-5)
