"""The training losses against NumPy transcriptions of the official PyTorch formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax.train import losses

RTOL = 1e-5


def _rng(seed=0):
  return np.random.default_rng(seed)


def _np_cos(a, b, eps=1e-8):
  na = np.maximum(np.linalg.norm(a, axis=-1), eps)
  nb = np.maximum(np.linalg.norm(b, axis=-1), eps)
  return np.sum(a * b, axis=-1) / (na * nb)


def test_cosine_similarity_matches_numpy():
  a, b = _rng().standard_normal((2, 5, 512)).astype(np.float32)
  np.testing.assert_allclose(losses.cosine_similarity(a, b), _np_cos(a, b), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("target", [1, -1])
def test_cosine_embedding_loss_matches_numpy(target):
  a, b = _rng(1).standard_normal((2, 8, 512)).astype(np.float32)
  b[:3] = a[:3] + 0.1 * b[:3]  # some pairs with a positive cosine, others near zero
  b[3:5] = -a[3:5]
  dot = np.sum(a.astype(np.float64) * b, axis=1)
  cos = dot / np.sqrt((np.sum(a.astype(np.float64) ** 2, 1) + 1e-12) * (np.sum(b.astype(np.float64) ** 2, 1) + 1e-12))
  want = np.mean(1 - cos) if target == 1 else np.mean(np.maximum(cos, 0))
  got = losses.cosine_embedding_loss(jnp.asarray(a), jnp.asarray(b), target)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_cosine_embedding_loss_rejects_other_targets():
  with pytest.raises(ValueError, match="target"):
    losses.cosine_embedding_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), 0)


def test_identity_diversity_loss_matches_numpy():
  ids = _rng(2).standard_normal((6, 16)).astype(np.float32)
  ids[1] = ids[0] * 2 + 0.01  # one strongly similar pair, so the clamp and the mean both matter
  b = ids.shape[0]
  cos = np.array([[_np_cos(ids[i], ids[j]) for j in range(b)] for i in range(b)])
  cos[np.arange(b), np.arange(b)] = 0.0
  want = np.maximum(cos, 0).sum() / b ** 2  # the mean runs over all B^2 entries, diagonal included
  np.testing.assert_allclose(losses.identity_diversity_loss(ids), want, rtol=RTOL, atol=1e-7)


def test_geometry_losses_are_plain_mses():
  r = _rng(3)
  ref = tuple(r.standard_normal(s).astype(np.float32) for s in [(2, 50, 3), (2, 68, 2), (2, 50, 3)])
  other = tuple(x + r.standard_normal(x.shape).astype(np.float32) for x in ref)
  got = losses.geometry_losses(ref, other)
  for name, x, y in zip(("shape", "landmark", "color"), ref, other):
    np.testing.assert_allclose(got[name], np.mean((x - y) ** 2), rtol=RTOL)


def test_l1_loss():
  x, y = _rng(4).uniform(-1, 1, (2, 2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.l1_loss(x, y), np.mean(np.abs(x - y)), rtol=RTOL)


def test_hiding_loss_is_bce_with_logits():
  r = _rng(5)
  logits = (r.standard_normal((2, 512, 32)) * 30).astype(np.float32)  # large |x|: needs the stable form
  bits = (r.uniform(size=logits.shape) < 0.5).astype(np.float32)
  x = logits.astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  with np.errstate(divide="ignore"):
    naive = -(bits * np.log(p) + (1 - bits) * np.log1p(-p))
  stable = np.logaddexp(0, x) - x * bits  # the same quantity where naive is finite
  finite = np.abs(x) < 15  # where the naive float64 form is still accurate
  np.testing.assert_allclose(stable[finite], naive[finite], rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(losses.hiding_loss(logits, bits), stable.mean(), rtol=RTOL)


def test_gan_losses():
  r = _rng(6)
  real, fake = (r.standard_normal((2, 8, 1)) * 3).astype(np.float32)
  softplus = lambda v: np.logaddexp(0, v.astype(np.float64))
  np.testing.assert_allclose(losses.generator_gan_loss(fake), softplus(-fake).mean(), rtol=RTOL)
  d_real, d_fake = losses.discriminator_gan_losses(real, fake)
  np.testing.assert_allclose(d_real, softplus(-real).mean(), rtol=RTOL)
  np.testing.assert_allclose(d_fake, softplus(fake).mean(), rtol=RTOL)


def test_r1_penalty_of_a_known_gradient():
  """D(x) = sum(w * x) per sample has gradient w everywhere: the penalty is sum(w^2)."""
  r = _rng(7)
  w = r.standard_normal((4, 4, 3)).astype(np.float32)
  x = r.standard_normal((3, 4, 4, 3)).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(jnp.sum(v * w, axis=(1, 2, 3))))(jnp.asarray(x))
  np.testing.assert_allclose(losses.r1_penalty(grad), np.sum(w.astype(np.float64) ** 2), rtol=RTOL)
  g = r.standard_normal((3, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(losses.r1_penalty(g), np.mean(np.sum(g.reshape(3, -1) ** 2, 1)), rtol=RTOL)
