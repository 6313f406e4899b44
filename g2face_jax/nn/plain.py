"""Plain (non-equalized) layers with PyTorch's default initialisation.

The official model's new parts (pyramid encoder, fusion masks, hiding
injections, extractor, dummy-identity net) are ordinary `nn.Conv2d` /
`nn.Linear` layers; training them from scratch as the recipe does needs
PyTorch's init: weights and biases uniform in +-1/sqrt(fan_in).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from g2face_jax.nn import lowering

# kaiming_uniform(a=sqrt(5)) as PyTorch draws it: bound = 1/sqrt(fan_in).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default bias init."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def Conv(in_features: int, features: int, kernel_size: int, stride: int = 1, padding: int = 0,
         use_bias: bool = True, name: str | None = None, dtype=None) -> nn.Conv:
  """`nn.Conv2d` equivalent on NHWC; kernel (k, k, in, out), bias (out,).

  `dtype` None (or 'float32'): the promoted input/parameter dtype, computed as the
  default `lowering.Lowering` says (`lax.conv`, or matmuls for unpadded 1x1
  kernels and, on CPU, the shapes XLA convolves slowly). 'bfloat16': bfloat16
  operands and float32 accumulation, float32 bias and output.
  """
  k, p = kernel_size, padding
  return nn.Conv(features, (k, k), strides=stride, padding=((p, p), (p, p)), use_bias=use_bias,
                 kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features * k * k),
                 name=name, conv_general_dilated=lowering.for_dtype(dtype).conv_general_dilated)


class ConcatConv1x1(nn.Module):
  """A 1x1 `Conv` over the channel concatenation of `parts`, without forming it.

  parts: arrays (B,H,W,C_i) -> (B,H,W,features). Parameters as `Conv`'s (kernel
  (1, 1, sum C_i, features), bias), so checkpoints and converters see one conv;
  the output is the sum of one matmul per part with its kernel rows, which on
  CPU costs less than copying the concatenation. `dtype` as `Conv`'s.
  """
  features: int
  dtype: Any = None

  @nn.compact
  def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
    cin = sum(p.shape[-1] for p in parts)
    kernel = self.param("kernel", torch_kernel_init, (1, 1, cin, self.features))
    bias = self.param("bias", torch_bias_init(cin), (self.features,))
    mm = lowering.matmul_dtype(self.dtype)
    out_dtype = jnp.result_type(*parts, kernel) if mm is None else jnp.float32
    out, start = None, 0
    for part in parts:
      rows = kernel[0, 0, start:start + part.shape[-1]]
      start += part.shape[-1]
      product = lowering.channel_dot(part.astype(out_dtype), rows, operand_dtype=mm)
      out = product if out is None else out + product
    return out + bias.astype(out_dtype)


def Dense(in_features: int, features: int, name: str | None = None) -> nn.Dense:
  """`nn.Linear` equivalent; kernel (in, out), bias (out,)."""
  return nn.Dense(features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features),
                  name=name)


class BatchNorm(nn.Module):
  """PyTorch `BatchNorm1d/2d` over the last axis of x (..., C).

  Training (`use_running_average=False`): normalises with the biased batch
  variance and updates the running estimates PyTorch's way (momentum 0.1, the
  unbiased variance into `var`). Eval: running statistics. Statistics live in
  the 'batch_stats' collection as `mean` and `var`; affine `scale` and `bias`.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        n = x.size // c
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    y = (x - mean.astype(x.dtype)) * jax.lax.rsqrt(var + self.epsilon).astype(x.dtype)
    return y * scale.astype(x.dtype) + bias.astype(x.dtype)
