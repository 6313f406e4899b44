"""The password extractor (official `hiding_extractor`): image -> logits of the
16384 hidden bits."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import lowering, plain
from g2face_jax.nn.decoder import BITS_SHAPE, N_BITS

WIDTH = 128  # channels of the trunk; each branch has half
N_BLOCKS = 3
LRELU_SLOPE = 0.1


def output_channels(image_size: int) -> int:
  """Channels C of the final stride-2 conv, chosen so that C * (size/2)^2 = 16384.

  The official 256 config has C = 1 (one 128x128 map); a 32-pixel config has
  C = 64 (16x16 maps). Sizes must be powers of two from 2 to 256.
  """
  half = image_size // 2
  if image_size < 2 or image_size % 2 or N_BITS % (half * half):
    raise ValueError(f"image size {image_size}: (size/2)^2 must divide {N_BITS} "
                     "(a power of two from 2 to 256)")
  return N_BITS // (half * half)


class ExtractorBlock(nn.Module):
  """(B,H,W,128) -> (B,H,W,128): concat of branch A (conv1x1, BN, lReLU, conv3x3,
  BN, lReLU) and branch B (conv1x1, BN, lReLU), in that order. `dtype`: the convs'
  (`plain.Conv`)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    half = WIDTH // 2

    def bn(name):
      return plain.BatchNorm(use_running_average=not train, name=name)

    def act(h):
      return nn.leaky_relu(h, negative_slope=LRELU_SLOPE)

    def conv(cin, k, name, padding=0):
      return plain.Conv(cin, half, k, padding=padding, name=name, dtype=self.dtype)

    a = act(bn("bn_branch_1_1")(conv(WIDTH, 1, "conv1x1_branch_1")(x)))
    a = act(bn("bn_branch_1_2")(conv(half, 3, "conv3x3_branch_1", padding=1)(a)))
    b = act(bn("bn_branch_2_1")(conv(WIDTH, 1, "conv1x1_branch_2")(x)))
    return jnp.concatenate([a, b], axis=-1)


class PasswordExtractor(nn.Module):
  """Image (B, size, size, 3) in [-1, 1] -> bit logits (B, 512, 32).

  conv1x1 3->128, lReLU 0.1, three `ExtractorBlock`s, conv3x3 stride 2 (pad 1)
  128 -> `output_channels(image_size)`, then PyTorch's row-major view of the
  NCHW map: logits[b].ravel() = map[b].transpose(C, H, W).ravel(). For the
  official single-channel map this is the NHWC order too. `train=True` uses
  batch statistics and updates 'batch_stats' (apply with
  `mutable=['batch_stats']`); `train=False` the running statistics.

  `dtype` None or 'float32': the official float32 computation. 'bfloat16': the
  blocks' convs multiply bfloat16 operands with float32 accumulation
  (`lowering.Lowering`); the 3-channel input conv, the output conv, BatchNorm and
  activations stay float32, and so do the logits.
  """
  image_size: int = 256
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    lowering.matmul_dtype(self.dtype)  # a bad dtype fails here, by name
    if x.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"expected images (B, {self.image_size}, {self.image_size}, 3), "
                       f"got {x.shape}")
    c_out = output_channels(self.image_size)
    h = nn.leaky_relu(plain.Conv(3, WIDTH, 1, name="conv1x1_input")(x), negative_slope=LRELU_SLOPE)
    for i in range(N_BLOCKS):
      h = ExtractorBlock(dtype=self.dtype, name=f"body_{i}")(h, train)
    h = plain.Conv(WIDTH, c_out, 3, stride=2, padding=1, name="conv1x1_output")(h)
    return jnp.transpose(h, (0, 3, 1, 2)).reshape((x.shape[0],) + BITS_SHAPE)
