"""The official G2Face training losses, as pure functions of arrays.

Each matches the PyTorch function the official `loss/` package calls, with
its reduction (a mean unless stated). Weights are applied by the caller
(`train/step.py`) from the config's `loss` section.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

COSINE_EPS = 1e-8  # torch.cosine_similarity: each norm clamped to >= 1e-8
EMBEDDING_EPS = 1e-12  # torch cosine_embedding_loss: added to each squared norm


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """torch.cosine_similarity over the last axis: (..., D), (..., D) -> (...)."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), COSINE_EPS)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), COSINE_EPS)
  return jnp.sum((a / na) * (b / nb), axis=-1)


def cosine_embedding_loss(a: jax.Array, b: jax.Array, target: float) -> jax.Array:
  """torch `CosineEmbeddingLoss()` (margin 0, mean) with one target for the batch.

  a, b: (B, D); target +1 (pull together: 1 - cos) or -1 (push apart: max(0, cos)).
  """
  if target not in (1, -1):
    raise ValueError(f"cosine embedding target must be +1 or -1, got {target}")
  dot = jnp.sum(a * b, axis=-1)
  cos = dot / jnp.sqrt((jnp.sum(a * a, axis=-1) + EMBEDDING_EPS)
                       * (jnp.sum(b * b, axis=-1) + EMBEDDING_EPS))
  per_sample = 1.0 - cos if target == 1 else jnp.maximum(cos, 0.0)
  return jnp.mean(per_sample)


def identity_diversity_loss(ids: jax.Array) -> jax.Array:
  """Dummy identities (B, D) -> mean over all B^2 pairs of max(cos, 0), diagonal zeroed."""
  cos = cosine_similarity(ids[:, None, :], ids[None, :, :])
  off_diagonal = cos * (1.0 - jnp.eye(ids.shape[0], dtype=cos.dtype))
  return jnp.mean(jnp.maximum(off_diagonal, 0.0))


def geometry_losses(reference: tuple, other: tuple) -> dict[str, jax.Array]:
  """MSE of each 3DMM quantity; both tuples are `nn.bfm.compute_for_loss` outputs
  (face_shape (B,N,3), landmark (B,68,2), color (B,N,3)). Unweighted."""
  names = ("shape", "landmark", "color")
  return {n: jnp.mean(jnp.square(r - o)) for n, r, o in zip(names, reference, other)}


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute difference of two images (B, H, W, 3)."""
  return jnp.mean(jnp.abs(x - y))


def hiding_loss(logits: jax.Array, bits: jax.Array) -> jax.Array:
  """torch `binary_cross_entropy_with_logits` (mean): logits, bits (B, 512, 32), bits in {0, 1}."""
  return jnp.mean(jnp.maximum(logits, 0) - logits * bits + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def generator_gan_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating generator loss: mean softplus(-D(fake)); logits (B, 1)."""
  return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_gan_losses(real_logits: jax.Array,
                             fake_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean softplus(-D(real)), mean softplus(D(fake))); logits (B, 1)."""
  return jnp.mean(jax.nn.softplus(-real_logits)), jnp.mean(jax.nn.softplus(fake_logits))


def r1_penalty(real_grad: jax.Array) -> jax.Array:
  """Gradient of sum(D(real)) w.r.t. the real images (B, H, W, 3) -> mean over the batch
  of its summed squares (the official penalty: no gamma / 2, no lazy-interval scaling)."""
  return jnp.mean(jnp.sum(jnp.square(real_grad.reshape(real_grad.shape[0], -1)), axis=1))
