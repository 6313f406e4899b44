"""Deep3DFaceRecon coefficient regressor (`ReconNetWrapper('resnet50')`), frozen (eval mode).

A torchvision ResNet-50 trunk (Bottleneck blocks, stride in the 3x3 conv),
global average pool, then seven linear heads on the 2048 pooled features
whose outputs are concatenated into the 257 3DMM coefficients. Input
(B, H, W, 3) RGB in [0, 1] (the caller passes `(x + 1) / 2`), any size the
trunk accepts (256x256 in G2Face).
"""
from __future__ import annotations

import types
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import plain

RESNET50 = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)
EXPANSION = 4
HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)  # id, exp, tex, angles, gamma, (tx, ty), tz
NUM_COEFFS = sum(HEAD_SIZES)  # 257

COEFF_SLICES = types.MappingProxyType({
    "id": slice(0, 80),
    "exp": slice(80, 144),
    "tex": slice(144, 224),
    "angles": slice(224, 227),
    "gamma": slice(227, 254),
    "translation": slice(254, 257),
})


def split_coefficients(coeff: jax.Array) -> dict[str, jax.Array]:
  """(B, 257) -> {'id': (B,80), 'exp': (B,64), 'tex': (B,80), 'angles': (B,3),
  'gamma': (B,27), 'translation': (B,3)}."""
  return {name: coeff[:, s] for name, s in COEFF_SLICES.items()}


def geometry_input(coeff: jax.Array) -> jax.Array:
  """(B, 257) -> (B, 147): identity, expression and angles, the style mapper's geometry input."""
  id_and_exp = coeff[:, 0:144]
  return jnp.concatenate([id_and_exp, coeff[:, COEFF_SLICES["angles"]]], axis=1)


def _frozen_bn(name: str) -> plain.BatchNorm:
  return plain.BatchNorm(use_running_average=True, name=name)


class Bottleneck(nn.Module):
  """conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 -> BN, plus the
  shortcut (conv1x1 (stride) -> BN when the shape changes), ReLU.
  (B, H, W, Cin) -> (B, H/s, W/s, 4 * width)."""
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin, w, cout = x.shape[-1], self.width, EXPANSION * self.width
    out = plain.Conv(cin, w, 1, use_bias=False, name="conv1")(x)
    out = nn.relu(_frozen_bn("bn1")(out))
    out = plain.Conv(w, w, 3, stride=self.stride, padding=1, use_bias=False, name="conv2")(out)
    out = nn.relu(_frozen_bn("bn2")(out))
    out = plain.Conv(w, cout, 1, use_bias=False, name="conv3")(out)
    out = _frozen_bn("bn3")(out)
    if self.stride != 1 or cin != cout:
      x = plain.Conv(cin, cout, 1, stride=self.stride, use_bias=False, name="downsample_conv")(x)
      x = _frozen_bn("downsample_bn")(x)
    return nn.relu(out + x)


class ResNetTrunk(nn.Module):
  """torchvision ResNet without its fc: (B, H, W, 3) -> pooled features (B, 2048).

  Submodules are named after the official keys: `layer{stage}_{block}` for `layer{stage}.{block}`.
  """
  layers: Sequence[int] = RESNET50

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = plain.Conv(3, STAGE_WIDTHS[0], 7, stride=2, padding=3, use_bias=False, name="conv1")(x)
    x = nn.relu(_frozen_bn("bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, blocks) in enumerate(zip(STAGE_WIDTHS, self.layers), start=1):
      for block in range(blocks):
        stride = 2 if block == 0 and stage > 1 else 1
        x = Bottleneck(width, stride=stride, name=f"layer{stage}_{block}")(x)
    return jnp.mean(x, axis=(1, 2))


class ReconNet(nn.Module):
  """Deep3DFaceRecon regressor: x (B, H, W, 3) in [0, 1] -> coefficients (B, 257)
  laid out as in `COEFF_SLICES`. `layers`: bottleneck blocks per stage (official:
  ResNet-50; shallower only for random-weight smoke and test models)."""
  layers: Sequence[int] = RESNET50

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = ResNetTrunk(self.layers, name="backbone")(x)
    heads = [plain.Dense(features.shape[-1], n, name=f"final_layers_{i}")(features)
             for i, n in enumerate(HEAD_SIZES)]
    return jnp.concatenate(heads, axis=1)
