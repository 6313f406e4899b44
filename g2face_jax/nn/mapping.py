"""Latent mappers: the style mapper (official `style_mlp`) and the dummy-identity
net (official `map_2_id`)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import plain, stylegan

PIXEL_NORM_EPS = 1e-8
STYLE_HEADS = ("style_low", "style_middle", "style_high")


def pixel_norm(x: jax.Array, eps: float = PIXEL_NORM_EPS) -> jax.Array:
  """x / sqrt(mean(x^2 over the last axis) + eps); x (B, D)."""
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class StyleMapper(nn.Module):
  """(identity, geometry) -> per-layer decoder styles.

  identity (B, 512) and geometry (B, 147) (any widths) are concatenated in
  that order and pixel-normalised; three heads (`style_low`, `style_middle`,
  `style_high`) of `n_mlp` equalized linear layers (lr multiplier `lr_mul`,
  fused leaky ReLU x sqrt 2, the official bias-added-twice quirk) each give one
  style, repeated `repeats[i]` times. Output (B, sum(repeats), style_dim),
  unbounded. Defaults are the official 256-pixel config: 6 + 6 + 2 = 14 styles.
  Parameters: `{head}_{i}` with `weight` (in, style_dim) and `bias` (style_dim,).
  """
  style_dim: int = 512
  n_mlp: int = 4
  lr_mul: float = 0.01
  repeats: Sequence[int] = (6, 6, 2)

  @nn.compact
  def __call__(self, identity: jax.Array, geometry: jax.Array) -> jax.Array:
    if len(self.repeats) != len(STYLE_HEADS):
      raise ValueError(f"repeats needs one count per head {STYLE_HEADS}, got {self.repeats}")
    latent = pixel_norm(jnp.concatenate([identity, geometry], axis=-1))
    styles = []
    for head, count in zip(STYLE_HEADS, self.repeats):
      h = latent
      for i in range(self.n_mlp):
        h = stylegan.EqualLinear(self.style_dim, lr_mul=self.lr_mul, activation=True,
                                 bias_twice=True, name=f"{head}_{i}")(h)
      styles.append(jnp.repeat(h[:, None, :], count, axis=1))
    return jnp.concatenate(styles, axis=1)


class Map2ID(nn.Module):
  """Random code z (B, 512) -> dummy identity (B, features).

  Plain linear -> LeakyReLU 0.2 -> linear -> LeakyReLU 0.2 -> BatchNorm.
  `train=True` normalises with batch statistics and updates 'batch_stats'
  (apply with `mutable=['batch_stats']`; needs B > 1); `train=False` uses the
  running statistics. Parameters `fc1`, `fc2` (kernel (in, out), bias),
  `bn` (scale, bias; batch_stats mean, var).
  """
  features: int = 512

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
    h = plain.Dense(z.shape[-1], self.features, name="fc1")(z)
    h = nn.leaky_relu(h, negative_slope=0.2)
    h = plain.Dense(self.features, self.features, name="fc2")(h)
    h = nn.leaky_relu(h, negative_slope=0.2)
    return plain.BatchNorm(use_running_average=not train, name="bn")(h)
