"""StyleGAN2 layers (rosinality layout) in Flax linen, NHWC.

Equalized learning rate: parameters are stored unscaled, as the official
checkpoints hold them, and the `1/sqrt(fan_in) * lr_mul` gain is applied at
run time. Parameter layouts: conv kernels (kh, kw, Cin, Cout) (HWIO), linear
weights (in, out).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import lowering, ops

BLUR_TAPS = (1, 3, 3, 1)
DEMOD_EPS = 1e-8


def _normal(stddev: float = 1.0):
  return nn.initializers.normal(stddev=stddev)


class EqualLinear(nn.Module):
  """Equalized-lr linear layer; x (..., in) -> (..., features).

  `activation`: fused bias + leaky ReLU (slope 0.2, gain sqrt 2).
  `bias_twice`: the official style mapper's quirk of adding the bias in the
  linear layer and again in the fused activation.
  """
  features: int
  bias_init: float = 0.0
  lr_mul: float = 1.0
  activation: bool = False
  bias_twice: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_dim = x.shape[-1]
    weight = self.param("weight", _normal(1.0 / self.lr_mul), (in_dim, self.features))
    bias = self.param("bias", nn.initializers.constant(self.bias_init), (self.features,))
    scale = self.lr_mul / math.sqrt(in_dim)
    out = x @ (weight * scale).astype(x.dtype)
    b = (bias * self.lr_mul).astype(x.dtype)
    if not self.activation:
      return out + b
    if self.bias_twice:
      out = out + b
    return ops.fused_bias_leaky_relu(out, b)


class EqualConv(nn.Module):
  """Equalized-lr convolution (no bias); x (B,H,W,Cin) -> (B,H',W',features)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    k = self.kernel_size
    weight = self.param("weight", _normal(), (k, k, cin, self.features))
    return lowering.DEFAULT.conv2d(x, weight / math.sqrt(cin * k * k), self.stride, self.padding)


class FusedBiasLeakyReLU(nn.Module):
  """Learned bias + leaky ReLU (0.2) x sqrt 2; x (..., C)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return ops.fused_bias_leaky_relu(x, bias.astype(x.dtype))


class ModulatedConv(nn.Module):
  """Style-modulated convolution; x (B,H,W,Cin), style (B,S) -> (B,H',W',features).

  Formulation: the style scales the input channels, one shared kernel
  convolves the whole batch, and demodulation scales the output channels by
  `rsqrt(sum_{i,kh,kw} (w * s_i)^2 + 1e-8)`. This equals the official grouped
  convolution with per-sample kernels, but costs the same per image at any
  batch size and runs as an ordinary dense convolution. The equalized-lr gain
  scales the style too, so the stored kernel is convolved as it is.

  `upsample`: transposed 3x3 stride-2 convolution then the [1,3,3,1] blur
  (x4, pad (1, 1)), doubling H and W. `downsample`: blur (pad from the kernel
  size) then a stride-2 convolution.

  `dtype` None (or 'float32'): the convolution runs in x's dtype. 'bfloat16':
  bfloat16 operands, float32 accumulation and output (`lowering.Lowering`); the style,
  demodulation and filters stay float32.
  """
  features: int
  kernel_size: int
  demodulate: bool = True
  upsample: bool = False
  downsample: bool = False
  blur_taps: Sequence[float] = BLUR_TAPS
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, style: jax.Array) -> jax.Array:
    cin, k = x.shape[-1], self.kernel_size
    weight = self.param("weight", _normal(), (k, k, cin, self.features))
    s = EqualLinear(cin, bias_init=1.0, name="modulation")(style)  # (B, Cin)
    gain = 1.0 / math.sqrt(cin * k * k)
    lower = lowering.for_dtype(self.dtype)
    scale = (s.astype(jnp.float32) * gain)[:, None, None, :]
    if lower.operand_dtype is None:
      w = weight.astype(x.dtype)
      x = x * scale.astype(x.dtype)
    else:
      w = weight.astype(jnp.float32)  # rounded once, by the convolution
      x = x.astype(jnp.float32) * scale
    n_taps = len(self.blur_taps)
    if self.upsample:
      p = (n_taps - 2) - (k - 1)
      out = ops.conv_transpose2x_fir(x, w, ops.fir_taps(self.blur_taps, 4.0),
                                     pad=((p + 1) // 2 + 1, p // 2 + 1), lowering=lower)
    elif self.downsample:
      p = (n_taps - 2) + (k - 1)
      x = ops.upfirdn2d(x, ops.fir_taps(self.blur_taps), pad=((p + 1) // 2, p // 2))
      out = lower.conv2d(x, w, stride=2)
    else:
      out = lower.conv2d(x, w, padding=k // 2)
    if self.demodulate:
      s_sq = jnp.square(s.astype(jnp.float32))
      w_energy = ops.kernel_energy(weight.astype(jnp.float32)) * gain ** 2
      energy = jnp.einsum("bi,io->bo", s_sq, w_energy)
      out = out * jax.lax.rsqrt(energy + DEMOD_EPS)[:, None, None, :].astype(out.dtype)
    return out


class NoiseInjection(nn.Module):
  """x + strength * noise; x (B,H,W,C), noise (B,H,W,1)."""

  @nn.compact
  def __call__(self, x: jax.Array, noise: jax.Array) -> jax.Array:
    strength = self.param("weight", nn.initializers.zeros, (1,))
    return x + strength.astype(x.dtype) * noise.astype(x.dtype)


class ConstantInput(nn.Module):
  """Learned (size, size, C) map repeated over the batch."""
  channels: int
  size: int = 4

  @nn.compact
  def __call__(self, batch: int) -> jax.Array:
    const = self.param("input", _normal(), (1, self.size, self.size, self.channels))
    return jnp.broadcast_to(const, (batch,) + const.shape[1:])


class StyledConv(nn.Module):
  """Modulated conv -> + strength * noise -> fused bias + leaky ReLU; `dtype`: the conv's."""
  features: int
  kernel_size: int = 3
  upsample: bool = False
  blur_taps: Sequence[float] = BLUR_TAPS
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, style: jax.Array, noise: jax.Array) -> jax.Array:
    out = ModulatedConv(self.features, self.kernel_size, upsample=self.upsample,
                        blur_taps=self.blur_taps, dtype=self.dtype, name="conv")(x, style)
    out = NoiseInjection(name="noise")(out, noise)
    return FusedBiasLeakyReLU(name="activate")(out)


class ToRGB(nn.Module):
  """1x1 modulated conv to RGB (no demodulation) + bias, plus the up-sampled skip.

  x (B,H,W,C); skip (B,H/2,W/2,3) or None -> (B,H,W,3).
  """
  blur_taps: Sequence[float] = BLUR_TAPS

  @nn.compact
  def __call__(self, x: jax.Array, style: jax.Array, skip: jax.Array | None = None) -> jax.Array:
    out = ModulatedConv(3, 1, demodulate=False, name="conv")(x, style)
    out = out + self.param("bias", nn.initializers.zeros, (3,)).astype(out.dtype)
    if skip is not None:
      p = len(self.blur_taps) - 2
      out = out + ops.upfirdn2d(skip, ops.fir_taps(self.blur_taps, 4.0), up=2,
                                pad=((p + 1) // 2 + 1, p // 2))
    return out


class ConvLayer(nn.Module):
  """Discriminator conv: [blur] -> equalized conv -> [fused bias + lReLU | bias | nothing].

  With `downsample`, the blur pads from the kernel size and the conv has stride 2.
  """
  features: int
  kernel_size: int
  downsample: bool = False
  activate: bool = True
  bias: bool = True
  blur_taps: Sequence[float] = BLUR_TAPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    if self.downsample:
      p = (len(self.blur_taps) - 2) + (k - 1)
      x = ops.upfirdn2d(x, ops.fir_taps(self.blur_taps), pad=((p + 1) // 2, p // 2))
      out = EqualConv(self.features, k, stride=2, padding=0, name="conv")(x)
    else:
      out = EqualConv(self.features, k, padding=k // 2, name="conv")(x)
    if self.activate:
      return FusedBiasLeakyReLU(name="activate")(out)
    if self.bias:
      return out + self.param("bias", nn.initializers.zeros, (self.features,))
    return out


class ResBlock(nn.Module):
  """Discriminator residual block halving H and W; (conv + skip) / sqrt 2."""
  features: int
  blur_taps: Sequence[float] = BLUR_TAPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = ConvLayer(x.shape[-1], 3, blur_taps=self.blur_taps, name="conv1")(x)
    out = ConvLayer(self.features, 3, downsample=True, blur_taps=self.blur_taps, name="conv2")(out)
    skip = ConvLayer(self.features, 1, downsample=True, activate=False, bias=False,
                     blur_taps=self.blur_taps, name="skip")(x)
    return (out + skip) * (1.0 / math.sqrt(2.0))


def minibatch_stddev(x: jax.Array, group_size: int = 4, eps: float = 1e-8) -> jax.Array:
  """Append one channel: the std over a sample's group, averaged over C, H, W.

  x (B,H,W,C) -> (B,H,W,C+1). Groups as the official code forms them: with
  G = min(B, group_size), sample b belongs to group b mod (B / G).
  """
  b, h, w, c = x.shape
  g = min(b, group_size)
  if b % g:
    raise ValueError(f"batch {b} is not a multiple of the stddev group size {g}")
  y = x.reshape(g, b // g, h, w, c).astype(jnp.float32)
  std = jnp.sqrt(jnp.var(y, axis=0) + eps)  # (B/G, H, W, C)
  std = jnp.mean(std, axis=(1, 2, 3))  # (B/G,)
  std = jnp.tile(std, g)[:, None, None, None]  # sample b gets entry b mod (B/G)
  return jnp.concatenate([x, jnp.broadcast_to(std, (b, h, w, 1)).astype(x.dtype)], axis=-1)


class Discriminator(nn.Module):
  """StyleGAN2 residual discriminator; x (B,size,size,3) in [-1,1] -> (B,1) logits.

  `channels[i]` is the width at resolution 4 * 2**i (from 4 up to `size`).
  """
  size: int
  channels: Sequence[int]
  stddev_group: int = 4
  blur_taps: Sequence[float] = BLUR_TAPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    log_size = int(round(math.log2(self.size)))
    if 2 ** log_size != self.size or len(self.channels) != log_size - 1:
      raise ValueError(f"size {self.size} needs one channel width per resolution 4..{self.size}")
    width = dict(zip((4 * 2 ** i for i in range(len(self.channels))), self.channels))
    out = ConvLayer(width[self.size], 1, name="convs_0")(x)
    for n, i in enumerate(range(log_size, 2, -1), start=1):
      out = ResBlock(width[2 ** (i - 1)], blur_taps=self.blur_taps, name=f"convs_{n}")(out)
    out = minibatch_stddev(out, self.stddev_group)
    out = ConvLayer(width[4], 3, name="final_conv")(out)
    out = out.reshape(out.shape[0], -1)  # NHWC flatten; the converter permutes the weight
    out = EqualLinear(width[4], activation=True, name="final_linear_0")(out)
    return EqualLinear(1, name="final_linear_1")(out)
