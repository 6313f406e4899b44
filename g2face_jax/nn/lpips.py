"""LPIPS v0.1 with the VGG-16 trunk: the (frozen) perceptual distance of G2Face training.

distance(x0, x1) = sum over the five cuts k of
    mean over (h, w) of  sum_c w_k[c] * (n(f_k(x0)) - n(f_k(x1)))[h, w, c] ** 2
where f_k is the VGG-16 feature map after relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3 of the input shifted and scaled per channel, n unit-normalises over
channels, and w_k is the learned 1x1 head `lin{k}` (no bias). Dropout before
the heads is off, as in the official eval mode: there is no training mode.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from g2face_jax.nn import plain

# Conv widths of the five VGG-16 blocks; each block but the first starts with a 2x2 max-pool.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# LPIPS v0.1 `ScalingLayer`: x -> (x - shift) / scale, per RGB channel.
INPUT_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
INPUT_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
NORM_EPS = 1e-10


def vgg16_conv_name(block: int, layer: int) -> str:
  """Flax name of conv `layer` of `block` (both 1-based), e.g. 'conv3_2'."""
  return f"conv{block}_{layer}"


def unit_normalize(f: jax.Array) -> jax.Array:
  """f / (L2 norm over channels + 1e-10); f (B, H, W, C)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
  return f / (norm + NORM_EPS)


class VGG16Features(nn.Module):
  """torchvision `vgg16().features` (3x3 convs, pad 1, ReLU; floor-mode 2x2 max-pools).

  x (B, H, W, 3) -> the five maps relu1_2 .. relu5_3, (B, H / 2^k, W / 2^k, C_k)
  with sizes floored at every pool.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    cuts = []
    for block, widths in enumerate(VGG16_BLOCKS, start=1):
      if block > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for layer, width in enumerate(widths, start=1):
        conv = plain.Conv(x.shape[-1], width, 3, padding=1, name=vgg16_conv_name(block, layer))
        x = jax.nn.relu(conv(x))
      cuts.append(x)
    return cuts


class LPIPS(nn.Module):
  """LPIPS v0.1 'vgg' distance. x0, x1: (B, H, W, 3) in [-1, 1], H, W >= 16 -> (B,) >= 0.

  Params: `vgg` (VGG16Features) and the heads `lin0` .. `lin4`, 1x1 convs
  without bias, kernels (1, 1, C_k, 1).
  """

  @nn.compact
  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] != 3:
      raise ValueError(f"LPIPS takes two (B, H, W, 3) images of one shape, got {x0.shape} and {x1.shape}")
    batch = x0.shape[0]
    x = (jnp.concatenate([x0, x1], axis=0) - INPUT_SHIFT) / INPUT_SCALE  # one trunk pass for both
    distance = jnp.zeros((batch,), x.dtype)
    for k, f in enumerate(VGG16Features(name="vgg")(x)):
      f = unit_normalize(f)
      diff = jnp.square(f[:batch] - f[batch:])
      head = plain.Conv(f.shape[-1], 1, 1, use_bias=False, name=f"lin{k}")
      distance = distance + jnp.mean(head(diff), axis=(1, 2, 3))
    return distance
