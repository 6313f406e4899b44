"""The InceptionV3 of FID (pool3 features), frozen, as pytorch-fid 0.3.0 runs it.

`InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)`:
images (B, H, W, 3) in [0, 1] are resized to 299x299 (bilinear, half-pixel
centres, no antialiasing: PyTorch's `align_corners=False`), mapped to [-1, 1]
and run through the trunk of the TensorFlow 2015-12-05 Inception, whose
differences from torchvision's InceptionV3 are kept: the pool branch of the
A, C and first E blocks averages over the unpadded window only, and the last
E block max-pools. Output: (B, 2048) means of the last block over space.

Every conv is `BasicConv2d` (conv without bias -> BatchNorm, eps 0.001 -> ReLU).
Module names are the PyTorch ones (`Mixed_6b/branch7x7_2/conv`), so the
converter is a plain name table.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import plain

INPUT_SIZE = 299
FEATURES = 2048
BN_EPSILON = 1e-3

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) -> frozen BatchNorm (eps 1e-3) -> ReLU on (B, H, W, Cin) -> (B, H', W', features).

  kernel, stride, padding: int or (height, width), as `nn.Conv2d` takes them.
  """
  features: int
  kernel: int | Pair
  stride: int = 1
  padding: int | Pair = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False,
                kernel_init=plain.torch_kernel_init, name="conv")(x)
    x = plain.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return jax.nn.relu(x)


def _avg_pool_unpadded(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average over the window's in-image pixels only (TensorFlow's rule)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
  p = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=p)


class InceptionA(nn.Module):
  """1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | unpadded avg pool -> 1x1: 224 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = BasicConv(64, 1, name="branch1x1")(x)
    b5 = BasicConv(48, 1, name="branch5x5_1")(x)
    b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_unpadded(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: 3x3 s2 | 1x1 -> 3x3 -> 3x3 s2 | max pool s2: 480 + Cin channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
    bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Factorised 7x7 block (1x7 / 7x1 convs of width c7), unpadded avg pool: 768 channels."""
  c7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.c7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, 1, name="branch1x1")(x)
    b7 = BasicConv(c7, 1, name="branch7x7_1")(x)
    b7 = BasicConv(c7, **row, name="branch7x7_2")(b7)
    b7 = BasicConv(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv(c7, 1, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_unpadded(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8: 1x1 -> 3x3 s2 | 1x1 -> 1x7 -> 7x1 -> 3x3 s2 | max pool s2:
  512 + Cin channels."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = BasicConv(192, 1, name="branch3x3_1")(x)
    b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Expanded-filter block: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1:
  2048 channels. Pool: unpadded 3x3 average, or 3x3 max (padded with -inf) when max_pool."""
  max_pool: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def split(y: jax.Array, prefix: str) -> jax.Array:
      a = BasicConv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y)
      b = BasicConv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)
      return jnp.concatenate([a, b], axis=-1)

    b1 = BasicConv(320, 1, name="branch1x1")(x)
    b3 = split(BasicConv(384, 1, name="branch3x3_1")(x), "branch3x3_2")
    bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
    bd = split(BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd), "branch3x3dbl_3")
    pooled = _max_pool_3x3(x, 1, padding=1) if self.max_pool else _avg_pool_unpadded(x)
    bp = BasicConv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """(B, H, W, C) -> (B, size, size, C), bilinear with half-pixel centres and edge
  clamping, no antialiasing: `F.interpolate(mode='bilinear', align_corners=False)`."""
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=False)


class FIDInceptionV3(nn.Module):
  """images (B, H, W, 3) float in [0, 1] -> (B, 2048) pool3 features (eval mode only).

  Variables: 'params' (conv kernels, BN scale/bias) and 'batch_stats' (BN mean/var).
  """

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FID InceptionV3 takes (B, H, W, 3) images, got {images.shape}")
    x = 2.0 * resize_bilinear(images.astype(jnp.float32)) - 1.0
    x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3(x, 2)
    x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3(x, 2)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))
