"""The G2Face decoder (official `anonymous_net`): StyleGAN2 synthesis guided by
an encoder pyramid of the input image through identity-aware fusion masks,
with the password bits injected at every resolution but the last.

Data flow at resolution r (8 .. size), style index i = 1 + 2 * level:
  hidden_a = HidingInjection(bits)                        (r < size only)
  out = StyledConv(up)(out, style[i])
  mask = FusionMask([out, encoder_r, hidden_a])
  out = mask * out + (1 - mask) * encoder_r (+ HidingInjection(bits) if r < size)
  out = StyledConv(out, style[i + 1]);  rgb = ToRGB(out, style[i + 2], rgb)
At 4x4 the fusion mask blends the constant input with the deepest encoder map
before `conv1`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax

from g2face_jax.nn import lowering, ops, plain, stylegan

BITS_SHAPE = (512, 32)  # 512 float32 identity values x 32 bits
N_BITS = BITS_SHAPE[0] * BITS_SHAPE[1]


def hiding_channels(resolution: int) -> int:
  """Channels of the (r, r) map the 16384 bits are folded into."""
  return math.ceil(N_BITS / resolution ** 2)


def noise_shapes(size: int, batch: int) -> list[tuple[int, int, int, int]]:
  """Shapes (B, r, r, 1) of the per-layer noise, in official order (conv1, convs.0, ...)."""
  log_size = int(round(math.log2(size)))
  shapes = [(batch, 4, 4, 1)]
  for level in range(log_size - 2):
    r = 8 * 2 ** level
    shapes += [(batch, r, r, 1)] * 2
  return shapes


def num_styles(size: int) -> int:
  """Number of style vectors the decoder reads (14 at 256)."""
  return 2 * int(round(math.log2(size))) - 2


class PyramidConv(nn.Module):
  """Plain conv -> InstanceNorm -> [LeakyReLU 0.2]; 4x4 stride 2 when down-sampling, else 3x3.

  `dtype`: the conv's (`plain.Conv`); the norm runs on its output's dtype.
  """
  features: int
  downsample: bool
  activate: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, stride = (4, 2) if self.downsample else (3, 1)
    out = plain.Conv(x.shape[-1], self.features, k, stride=stride, padding=1, name="conv",
                     dtype=self.dtype)(x)
    out = ops.instance_norm(out)
    return jax.nn.leaky_relu(out, 0.2) if self.activate else out


class PyramidBlock(nn.Module):
  """Encoder block: (conv1 -> conv2) + skip, over sqrt 2; `dtype`: the convs'."""
  features: int
  downsample: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = PyramidConv(x.shape[-1], downsample=False, dtype=self.dtype, name="conv1")(x)
    out = PyramidConv(self.features, self.downsample, dtype=self.dtype, name="conv2")(out)
    skip = PyramidConv(self.features, self.downsample, activate=False, dtype=self.dtype,
                       name="skip")(x)
    return (out + skip) * (1.0 / math.sqrt(2.0))


class FusionMask(nn.Module):
  """Plain 1x1 conv -> InstanceNorm -> sigmoid over the channel concatenation of
  `parts` (each (B,H,W,C_i)): the IFF mask in (0, 1), (B,H,W,features).

  `dtype`: the conv's (`plain.ConcatConv1x1`).
  """
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    out = plain.ConcatConv1x1(self.features, name="conv", dtype=self.dtype)(parts)
    return jax.nn.sigmoid(ops.instance_norm(out))


class HidingInjection(nn.Module):
  """bits (B,512,32) -> (B,r,r,features): fold, 1x1 conv, fused bias-lReLU, x strength."""
  resolution: int
  features: int

  @nn.compact
  def __call__(self, bits: jax.Array) -> jax.Array:
    r, c = self.resolution, hiding_channels(self.resolution)
    if c * r * r != N_BITS:
      raise ValueError(f"{N_BITS} bits do not fold into ({c}, {r}, {r})")
    b = bits.shape[0]
    folded = bits.reshape(b, c, r, r).transpose(0, 2, 3, 1)  # the official NCHW view, as NHWC
    out = plain.Conv(c, self.features, 1, name="conv")(folded)
    out = stylegan.FusedBiasLeakyReLU(name="activate")(out)
    strength = self.param("weight", nn.initializers.zeros, (self.features,))
    return out * strength.astype(out.dtype)


class Decoder(nn.Module):
  """G2Face `anonymous_net`.

  Call with x (B,size,size,3) in [-1,1], styles (B, num_styles(size), style_dim),
  bits (B,512,32) in {0,1} and `noise`, a sequence of (B,r,r,1) arrays in the
  order of `noise_shapes` (or None to draw it from the 'noise' RNG stream).
  Returns the image (B,size,size,3), unclipped.

  `channels[i]`: width at resolution 4 * 2**i, from 4 up to `size`.

  `dtype` None or 'float32': the official float32 computation (following x's
  dtype). 'bfloat16': the styled convolutions, the pyramid encoder and the
  fusion-mask convs multiply bfloat16 operands with float32 accumulation
  (`lowering.Lowering`); activations between layers, styles, demodulation,
  normalisation, noise, biases, FIR filters, hiding injections and ToRGB stay
  float32, and so does the returned image.
  """
  size: int
  channels: Sequence[int]
  blur_taps: Sequence[float] = stylegan.BLUR_TAPS
  dtype: Any = None

  def setup(self):
    lowering.matmul_dtype(self.dtype)  # a bad dtype fails here, by name
    log_size = int(round(math.log2(self.size)))
    if 2 ** log_size != self.size or self.size < 8 or len(self.channels) != log_size - 1:
      raise ValueError(f"decoder size {self.size} must be a power of two >= 8 with one "
                       f"channel width per resolution 4..{self.size}, got {list(self.channels)}")
    if self.size > 256:
      raise ValueError(f"decoder size {self.size}: the 16384 bits fold only into maps up to 128x128")
    self.n_levels = log_size - 2
    ch = list(self.channels)
    self.input = stylegan.ConstantInput(ch[0])
    self.conv1 = stylegan.StyledConv(ch[0], blur_taps=self.blur_taps, dtype=self.dtype)
    self.to_rgb1 = stylegan.ToRGB(blur_taps=self.blur_taps)
    convs, to_rgbs, injects = [], [], []
    for level in range(self.n_levels):
      res, width = 8 * 2 ** level, ch[level + 1]
      convs.append(stylegan.StyledConv(width, upsample=True, blur_taps=self.blur_taps,
                                       dtype=self.dtype))
      convs.append(stylegan.StyledConv(width, blur_taps=self.blur_taps, dtype=self.dtype))
      to_rgbs.append(stylegan.ToRGB(blur_taps=self.blur_taps))
      if res < self.size:
        injects += [HidingInjection(res, width), HidingInjection(res, width)]
    self.convs, self.to_rgbs, self.hiding_injects = convs, to_rgbs, injects
    # pyramid[k] and fusion_mask[k] work at resolution size / 2**k.
    widths = ch[::-1]
    self.pyramid = [PyramidBlock(widths[0], downsample=False, dtype=self.dtype)] + [
        PyramidBlock(w, dtype=self.dtype) for w in widths[1:]]
    self.fusion_mask = [FusionMask(w, dtype=self.dtype) for w in widths]

  def __call__(self, x: jax.Array, styles: jax.Array, bits: jax.Array,
               noise: Sequence[jax.Array] | None = None) -> jax.Array:
    b = x.shape[0]
    if x.shape[1:] != (self.size, self.size, 3):
      raise ValueError(f"decoder input must be (B,{self.size},{self.size},3), got {x.shape}")
    if styles.shape[:2] != (b, num_styles(self.size)):
      raise ValueError(f"styles must be (B,{num_styles(self.size)},S), got {styles.shape}")
    if bits.shape != (b,) + BITS_SHAPE:
      raise ValueError(f"bits must be (B,512,32), got {bits.shape}")
    if noise is None:
      rng = self.make_rng("noise")
      noise = [jax.random.normal(k, s, x.dtype)
               for k, s in zip(jax.random.split(rng, 1 + 2 * self.n_levels),
                               noise_shapes(self.size, b))]
    bits = bits.astype(x.dtype)

    features = []
    h = x
    for block in self.pyramid:
      h = block(h)
      features.append(h)

    out = self.input(b).astype(x.dtype)
    enc = features[-1]
    mask = self.fusion_mask[-1]([out, enc])
    out = mask * out + (1 - mask) * enc
    out = self.conv1(out, styles[:, 0], noise[0])
    rgb = self.to_rgb1(out, styles[:, 1])

    for level in range(self.n_levels):
      i = 1 + 2 * level
      enc = features[-(level + 2)]
      hiding = 2 * level < len(self.hiding_injects)
      out = self.convs[2 * level](out, styles[:, i], noise[i])
      if hiding:
        mask_in = [out, enc, self.hiding_injects[2 * level](bits)]
      else:
        mask_in = [out, enc]
      mask = self.fusion_mask[-(level + 2)](mask_in)
      out = mask * out + (1 - mask) * enc
      if hiding:
        out = out + self.hiding_injects[2 * level + 1](bits)
      out = self.convs[2 * level + 1](out, styles[:, i + 1], noise[i + 1])
      rgb = self.to_rgbs[level](out, styles[:, i + 2], rgb)
    return rgb
