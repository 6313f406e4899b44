"""ArcFace identity encoder: insightface `iresnet50` / `iresnet100`, frozen (eval mode).

Input (B, H, W, 3) RGB in [-1, 1]; an input that is not 112 wide is first
resized to 112x112 with PyTorch's default nearest-neighbour rule. Output
(B, 512) identity embeddings, not normalised (as the official network).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from g2face_jax.nn import plain

IRESNET50 = (3, 4, 14, 3)
IRESNET100 = (3, 13, 30, 3)
INPUT_SIZE = 112
STAGE_WIDTHS = (64, 128, 256, 512)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output index, `floor(dst * in / out)` as PyTorch's default
  `F.interpolate(mode='nearest')` computes it (float32 scale, clamped to in - 1)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """(B, H, W, C) -> (B, height, width, C), nearest neighbour by exact gathers."""
  x = jnp.take(x, nearest_indices(x.shape[1], height), axis=1)
  return jnp.take(x, nearest_indices(x.shape[2], width), axis=2)


class PReLU(nn.Module):
  """Per-channel PReLU on (..., C): x if x >= 0 else slope * x (slope starts at 0.25)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],))
    return jnp.where(x >= 0, x, slope * x)


def _frozen_bn(name: str) -> plain.BatchNorm:
  return plain.BatchNorm(use_running_average=True, name=name)


class IBasicBlock(nn.Module):
  """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus the shortcut
  (conv1x1 (stride) -> BN when the shape changes). (B, H, W, Cin) -> (B, H/s, W/s, features)."""
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin, f = x.shape[-1], self.features
    out = _frozen_bn("bn1")(x)
    out = plain.Conv(cin, f, 3, padding=1, use_bias=False, name="conv1")(out)
    out = _frozen_bn("bn2")(out)
    out = PReLU(name="prelu")(out)
    out = plain.Conv(f, f, 3, stride=self.stride, padding=1, use_bias=False, name="conv2")(out)
    out = _frozen_bn("bn3")(out)
    if self.stride != 1 or cin != f:
      x = plain.Conv(cin, f, 1, stride=self.stride, use_bias=False, name="downsample_conv")(x)
      x = _frozen_bn("downsample_bn")(x)
    return out + x


class IResNet(nn.Module):
  """insightface IResNet; `layers` blocks per stage (IRESNET50 or IRESNET100).

  x (B, H, W, 3) in [-1, 1] -> (B, num_features) embedding. Submodules are
  named after the official keys: `layer{stage}_{block}` for `layer{stage}.{block}`.
  """
  layers: Sequence[int] = IRESNET50
  num_features: int = 512

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[2] != INPUT_SIZE:
      x = resize_nearest(x, INPUT_SIZE, INPUT_SIZE)
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"ArcFace needs (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, got {x.shape}")
    x = plain.Conv(3, STAGE_WIDTHS[0], 3, padding=1, use_bias=False, name="conv1")(x)
    x = _frozen_bn("bn1")(x)
    x = PReLU(name="prelu")(x)
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, self.layers), start=1):
      for block in range(blocks):
        x = IBasicBlock(width, stride=2 if block == 0 else 1, name=f"layer{stage}_{block}")(x)
    x = _frozen_bn("bn2")(x)
    x = x.reshape(x.shape[0], -1)  # NHWC flatten; the converter permutes `fc` to match
    x = plain.Dense(x.shape[-1], self.num_features, name="fc")(x)
    return _frozen_bn("features")(x)
