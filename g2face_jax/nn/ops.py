"""The model's low-level ops on NHWC arrays, each fast form beside a plain reference.

FIR filtering (`upfirdn2d`), the transposed 2x up-sampling convolution
(`conv_transpose2x`, `conv_transpose2x_fir`), fused bias + leaky ReLU, instance
norm, the demodulation energy. The fast forms are what the networks use; the
`*_reference` forms are written the obvious way so tests can check the fast ones
against them. How the convolutions inside them are computed is the `Lowering`
policy the caller passes (`nn.lowering`).

PyTorch's NCHW is never seen here: callers and converters deal with it.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from g2face_jax.nn import lowering as lowering_lib

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def fused_bias_leaky_relu(x: jax.Array, bias: jax.Array, slope: float = LRELU_SLOPE,
                          gain: float = LRELU_GAIN) -> jax.Array:
  """`gain * leaky_relu(x + bias)`; x: (..., C), bias: (C,)."""
  return gain * jax.nn.leaky_relu(x + bias, negative_slope=slope)


def fir_taps(taps: Sequence[float], gain: float = 1.0) -> np.ndarray:
  """1-D taps of a separable FIR filter whose 2-D kernel is `outer(k, k) / sum`.

  `gain` is the 2-D gain (4 for 2x up-sampling); each axis gets its square root.
  """
  k = np.asarray(taps, np.float64)
  return (k / k.sum() * math.sqrt(gain)).astype(np.float32)


def fir_kernel_2d(taps: Sequence[float], gain: float = 1.0) -> np.ndarray:
  """The 2-D kernel `outer(k, k) / sum(outer(k, k)) * gain` (the official `make_kernel`)."""
  k = np.asarray(taps, np.float32)
  k2 = np.outer(k, k)
  return (k2 / k2.sum() * gain).astype(np.float32)


def _pads(pad) -> tuple[int, int, int, int]:
  """(p0, p1) for both axes or (py0, py1, px0, px1)."""
  pad = tuple(int(p) for p in pad)
  if len(pad) == 2:
    return pad + pad
  if len(pad) != 4:
    raise ValueError(f"pad must have 2 or 4 entries, got {pad}")
  return pad


def _upfirdn_1d(x: jax.Array, taps: np.ndarray, up: int, down: int, pad0: int,
                pad1: int, axis: int) -> jax.Array:
  """Up-sample by zero insertion, pad (negative crops), FIR-filter, down-sample along one axis."""
  n = x.shape[axis]
  if up > 1:
    zeros = jnp.zeros_like(x)
    x = jnp.stack([x] + [zeros] * (up - 1), axis=axis + 1)
    shape = list(x.shape)
    shape[axis:axis + 2] = [n * up]
    x = x.reshape(shape)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (max(pad0, 0), max(pad1, 0))
  x = jnp.pad(x, widths)
  start, stop = max(-pad0, 0), x.shape[axis] - max(-pad1, 0)
  x = jax.lax.slice_in_dim(x, start, stop, axis=axis)
  length = x.shape[axis] - len(taps) + 1
  if length <= 0:
    raise ValueError(f"upfirdn2d: padded size {x.shape[axis]} is smaller than the {len(taps)}-tap filter")
  flipped = taps[::-1]  # upfirdn2d convolves (flips the kernel) rather than correlates
  out = None
  for k, t in enumerate(flipped):
    if t == 0:
      continue
    term = jax.lax.slice_in_dim(x, k, k + length, axis=axis) * float(t)
    out = term if out is None else out + term
  if down > 1:
    out = jax.lax.slice_in_dim(out, 0, length, stride=down, axis=axis)
  return out


def _shifted(x: jax.Array, shift: int, length: int, axis: int) -> jax.Array:
  """`x[shift : shift + length]` along `axis`, zeros where that runs outside x."""
  n = x.shape[axis]
  lo, hi = max(-shift, 0), max(shift + length - n, 0)
  if lo or hi:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (lo, hi)
    x = jnp.pad(x, widths)
  return jax.lax.slice_in_dim(x, shift + lo, shift + lo + length, axis=axis)


def _fir_two_phases(phases: Sequence[jax.Array | None], taps: np.ndarray, pad0: int,
                    out_len: int, axis: int) -> list[jax.Array]:
  """FIR-filter a signal held as its two phases, returning the two phases of the result.

  The signal is `y[2m + p] = phases[p][m]` (None: all zeros) along `axis`; the
  result is `z[n] = sum_j taps[::-1][j] * y[n + j - pad0]` for `0 <= n < out_len`
  (even), with y zero outside its range: `upfirdn2d`'s padding and filtering
  along one axis, computed without interleaving y or multiplying by its zeros.
  """
  flipped = taps[::-1]
  out = []
  for q in range(2):
    acc = None
    for j, t in enumerate(flipped):
      d = q + j - pad0
      src = phases[d % 2]
      if t == 0 or src is None:
        continue
      term = _shifted(src, d // 2, out_len // 2, axis) * float(t)
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def _interleave(grid: Sequence[Sequence[jax.Array]]) -> jax.Array:
  """`out[:, 2m + p, 2n + q] = grid[p][q][:, m, n]`; each (B, M, N, C) -> (B, 2M, 2N, C)."""
  b, m, n, c = grid[0][0].shape
  rows = [jnp.stack(row, axis=3) for row in grid]  # (B, M, N, 2, C)
  return jnp.stack(rows, axis=2).reshape(b, 2 * m, 2 * n, c)


def _upfirdn_out_len(n: int, taps: int, up: int, down: int, pad0: int, pad1: int) -> int:
  return (n * up + pad0 + pad1 - taps) // down + 1


def upfirdn2d(x: jax.Array, taps: np.ndarray, up: int = 1, down: int = 1,
              pad=(0, 0)) -> jax.Array:
  """Separable upfirdn2d: x (B, H, W, C); `taps` the 1-D factor of the 2-D kernel.

  Same result as the official `upfirdn2d(x, outer(taps, taps), up, down, pad)`:
  zero-insertion up-sampling, padding (negative values crop), convolution with
  the kernel, then keeping every `down`-th sample. Written as shifted adds, one
  axis at a time (a depthwise convolution is slow on CPU). 2x up-sampling to an
  even size runs in polyphase form (each output phase a short FIR of x, no
  inserted zeros).
  """
  taps = np.asarray(taps, np.float32)
  if taps.ndim != 1:
    raise ValueError(f"upfirdn2d takes 1-D separable taps, got shape {taps.shape}; "
                     "use upfirdn2d_reference for a general 2-D kernel")
  py0, py1, px0, px1 = _pads(pad)
  oh = _upfirdn_out_len(x.shape[1], len(taps), up, down, py0, py1)
  ow = _upfirdn_out_len(x.shape[2], len(taps), up, down, px0, px1)
  if up == 2 and down == 1 and oh > 0 and ow > 0 and oh % 2 == 0 and ow % 2 == 0:
    rows = _fir_two_phases([x, None], taps, py0, oh, axis=1)
    return _interleave([_fir_two_phases([r, None], taps, px0, ow, axis=2) for r in rows])
  x = _upfirdn_1d(x, taps, up, down, py0, py1, axis=1)
  return _upfirdn_1d(x, taps, up, down, px0, px1, axis=2)


def upfirdn2d_reference(x: jax.Array, kernel: np.ndarray, up: int = 1, down: int = 1,
                        pad=(0, 0)) -> jax.Array:
  """Any 2-D FIR kernel (kh, kw), written as a depthwise convolution; x (B, H, W, C)."""
  kernel = np.asarray(kernel, np.float32)
  py0, py1, px0, px1 = _pads(pad)
  c = x.shape[-1]
  x = jax.lax.pad(x, jnp.array(0, x.dtype),
                  [(0, 0, 0), (py0, py1 + up - 1, up - 1), (px0, px1 + up - 1, up - 1), (0, 0, 0)])
  w = jnp.asarray(kernel[::-1, ::-1])[:, :, None, None] * jnp.ones((1, 1, 1, c), x.dtype)
  out = jax.lax.conv_general_dilated(
      x, w, window_strides=(down, down), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)
  return out


def _conv_transpose2x_phases(x: jax.Array, w: jax.Array,
                             lowering: lowering_lib.Lowering) -> list[list[jax.Array]]:
  """The four sub-pixel phases of `conv_transpose2x`: grid[py][px][:, m, n] = out[:, 2m+py, 2n+px].

  Each phase is an ordinary stride-1 convolution of x with the taps that land
  on it (output pixel 2m + p gathers taps i = p + 2t from input pixel m - t),
  computed as `lowering` says.
  """
  k = w.shape[0]
  if k < 2:
    raise ValueError(f"conv_transpose2x needs a kernel of at least 2 taps, got {k}")
  grid = []
  for py in range(2):
    row = []
    for px in range(2):
      sub = w[py::2, px::2][::-1, ::-1]
      th, tw = sub.shape[0], sub.shape[1]
      row.append(lowering.conv2d(x, sub, padding=((th - 1, th - 1), (tw - 1, tw - 1))))
    grid.append(row)
  return grid


def conv_transpose2x(x: jax.Array, w: jax.Array,
                     lowering: lowering_lib.Lowering = lowering_lib.DEFAULT) -> jax.Array:
  """PyTorch `conv_transpose2d(stride=2, padding=0)`; x (B,H,W,Cin), w (k,k,Cin,Cout).

  Output (B, 2H + k - 2, 2W + k - 2, Cout). `w[i, j]` is the tap that PyTorch
  indexes `weight[:, :, i, j]`. Written as four sub-pixel phases, each an
  ordinary stride-1 convolution of the input with a subset of the taps: no
  multiplications by inserted zeros, and every phase runs at convolution speed.
  `lowering`: how the phases' convolutions are computed (bfloat16 operands give a
  float32 result).
  """
  k = w.shape[0]
  b, h, wd, _ = x.shape
  grid = _conv_transpose2x_phases(x, w, lowering)
  ph, pw = h + (k + 1) // 2 - 1, wd + (k + 1) // 2 - 1
  grid = [[jnp.pad(p, ((0, 0), (0, ph - p.shape[1]), (0, pw - p.shape[2]), (0, 0))) for p in row]
          for row in grid]
  return _interleave(grid)[:, :2 * h + k - 2, :2 * wd + k - 2]


def conv_transpose2x_fir(x: jax.Array, w: jax.Array, taps: np.ndarray, pad,
                         lowering: lowering_lib.Lowering = lowering_lib.DEFAULT) -> jax.Array:
  """`upfirdn2d(conv_transpose2x(x, w), taps, pad=pad)` computed on the sub-pixel phases.

  x (B,H,W,Cin), w (k,k,Cin,Cout), `taps` the separable 1-D FIR factor. The
  filter runs on each phase at input resolution and the phases are interleaved
  once at the end, so the (2H + k - 2)-sized transposed-conv output is never
  formed. Falls back to the two-step form when an output side is odd.
  `lowering`: as `conv_transpose2x`'s; the filter runs on the phases' dtype.
  """
  taps = np.asarray(taps, np.float32)
  py0, py1, px0, px1 = _pads(pad)
  k = w.shape[0]
  oh = _upfirdn_out_len(2 * x.shape[1] + k - 2, len(taps), 1, 1, py0, py1)
  ow = _upfirdn_out_len(2 * x.shape[2] + k - 2, len(taps), 1, 1, px0, px1)
  if oh <= 0 or ow <= 0 or oh % 2 or ow % 2:
    return upfirdn2d(conv_transpose2x(x, w, lowering), taps, pad=pad)
  grid = _conv_transpose2x_phases(x, w, lowering)
  cols = [_fir_two_phases([grid[0][px], grid[1][px]], taps, py0, oh, axis=1) for px in range(2)]
  return _interleave([_fir_two_phases([cols[0][qy], cols[1][qy]], taps, px0, ow, axis=2)
                      for qy in range(2)])


def conv_transpose2x_reference(x: jax.Array, w: jax.Array) -> jax.Array:
  """Same as `conv_transpose2x`, written as a dilated convolution with the flipped kernel."""
  k = w.shape[0]
  return jax.lax.conv_general_dilated(
      x, w[::-1, ::-1].astype(x.dtype), window_strides=(1, 1),
      padding=((k - 1, k - 1), (k - 1, k - 1)), lhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """PyTorch `InstanceNorm2d` without affine: per sample and channel over H, W (biased var)."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def kernel_energy(w: jax.Array) -> jax.Array:
  """`sum(w ** 2, axis=(0, 1))` of a (kh, kw, Cin, Cout) kernel -> (Cin, Cout), float32 or w's dtype.

  Written as a sum of the kh * kw tap slices: XLA's CPU reduction over the two
  leading axes of a large kernel is far slower than the unrolled sum.
  """
  kh, kw = w.shape[:2]
  return sum(jnp.square(w[i, j]) for i in range(kh) for j in range(kw))


def nchw_flatten_order(c: int, h: int, w: int) -> np.ndarray:
  """Index map from an NHWC flatten to PyTorch's NCHW flatten of a (C, H, W) map.

  `nhwc_features = nchw_features[..., nchw_flatten_order(c, h, w)]`: used to
  permute the input rows of a linear layer that reads a flattened feature map.
  """
  return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
