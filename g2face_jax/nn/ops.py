"""Low-level StyleGAN2 ops on NHWC arrays, each with a plain reference form.

The fast forms are what the networks use; the `*_reference` forms are written
the obvious way and exist so tests can check the fast ones against them.

PyTorch's NCHW is never seen here: callers and converters deal with it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
  axis at a time: far faster on CPU than a depthwise convolution. 2x
  up-sampling to an even size runs in polyphase form (each output phase a
  short FIR of x, no inserted zeros).
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


MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


def matmul_dtype(dtype) -> jnp.dtype | None:
  """The convolution operand dtype a `dtype` option names: None for float32 (the
  default path, `lax.conv` in the input's dtype), bfloat16 for the matmul form.

  Takes None, 'float32', 'bfloat16' or the jnp dtypes; anything else is a ValueError.
  """
  if dtype is None:
    return None
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  if name not in MATMUL_DTYPES:
    raise ValueError(f"unknown compute dtype '{dtype}' (choose from {', '.join(MATMUL_DTYPES)})")
  return MATMUL_DTYPES[name]


def _space_to_depth2(x: jax.Array) -> jax.Array:
  """(B, 2H, 2W, C) -> (B, H, W, 4C), channel index (p * 2 + q) * C + c for pixel (2h+p, 2w+q)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def _kernel_space_to_depth2(w: jax.Array) -> jax.Array:
  """(k, k, Cin, Cout) -> (ceil(k/2), ceil(k/2), 4 Cin, Cout), the taps of `_space_to_depth2`
  inputs; odd k gets zero taps at the end."""
  kh, kw, cin, cout = w.shape
  w = jnp.pad(w, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
  w = w.reshape(w.shape[0] // 2, 2, w.shape[1] // 2, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  return w.reshape(w.shape[0], w.shape[1], 4 * cin, cout)


def _conv_out_size(x_shape, w_shape, stride: int, padding) -> tuple[int, int]:
  (pt, pb), (pl, pr) = padding
  return ((x_shape[1] + pt + pb - w_shape[0]) // stride + 1,
          (x_shape[2] + pl + pr - w_shape[1]) // stride + 1)


def _fold_stride2(x: jax.Array, w: jax.Array, padding, oh: int, ow: int):
  """A stride-2 convolution as a stride-1 one: the padded input (B,H,W,Cin) folded
  to (B, oh + t - 1, ow + t - 1, 4 Cin) by `_space_to_depth2` and the kernel to
  (t, t, 4 Cin, Cout) by `_kernel_space_to_depth2`, t = ceil(k / 2)."""
  (pt, _), (pl, _) = padding
  kh, kw = w.shape[:2]
  h, wd = x.shape[1:3]
  hp, wp = 2 * (oh + (kh - 1) // 2), 2 * (ow + (kw - 1) // 2)  # even sizes covering every tap
  x = jnp.pad(x, ((0, 0), (pt, max(hp - h - pt, 0)), (pl, max(wp - wd - pl, 0)), (0, 0)))
  return _space_to_depth2(x[:, :hp, :wp]), _kernel_space_to_depth2(w)


def _as_stride1(x: jax.Array, w: jax.Array, stride: int, padding, dtype):
  """x and w cast to `dtype`, x padded (stride 1) or folded with w (`_fold_stride2`),
  so that a valid stride-1 convolution of the two gives the (B,oh,ow,Cout) output."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  (pt, pb), (pl, pr) = padding
  oh, ow = _conv_out_size(x.shape, w.shape, stride, padding)
  x, w = x.astype(dtype), w.astype(dtype)
  if stride == 2:
    x, w = _fold_stride2(x, w, padding, oh, ow)
  elif stride == 1:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  else:
    raise ValueError(f"matmul convolutions support stride 1 or 2, got {stride}")
  return x, w, oh, ow


def _shifted_sum(y: jax.Array, offsets, oh: int, ow: int, cout: int) -> jax.Array:
  """sum over n of y[:, i:i + oh, j:j + ow, n Cout:(n + 1) Cout] for (i, j) = offsets[n]."""
  return sum(y[:, i:i + oh, j:j + ow, n * cout:(n + 1) * cout] for n, (i, j) in enumerate(offsets))


def conv2d_matmul(x: jax.Array, w: jax.Array, stride: int = 1, padding=0,
                  dtype=jnp.bfloat16) -> jax.Array:
  """`conv2d` as matrix products with `dtype` operands and float32 accumulation.

  x (B,H,W,Cin), w (kh,kw,Cin,Cout) of any float dtype -> float32 (B,H',W',Cout).
  The kw column shifts of the padded input are stacked on the channel axis, one
  dot_general multiplies them by all kh kernel rows at once (K = kw Cin, N =
  kh Cout) and the kh row-shifted slices of its output are summed; a one-row
  kernel instead puts its kw taps on N and sums column-shifted slices, with no
  stacked copy of the input (1x2, 256->128 on a 128x128 input: 10 against 28
  ms). Stride 2 becomes stride 1 on the space-to-depth input. XLA's CPU bfloat16
  matmuls run at about twice the float32 rate while its bfloat16 convolutions
  do not.
  """
  cout = w.shape[3]
  x, w, oh, ow = _as_stride1(x, w, stride, padding, dtype)
  kh, kw, cin = w.shape[:3]
  if kh == 1 and kw > 1:
    return conv2d_tap_matmul(x, w, 1, 0, dtype)
  cols = x[:, :, :ow] if kw == 1 else jnp.concatenate([x[:, :, j:j + ow] for j in range(kw)], -1)
  kernel = w.transpose(1, 2, 0, 3).reshape(kw * cin, kh * cout)  # rows (j, c), columns (i, o)
  y = jax.lax.dot_general(cols[:, :oh + kh - 1], kernel, (((3,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return _shifted_sum(y, [(i, 0) for i in range(kh)], oh, ow, cout)


def conv2d_tap_matmul(x: jax.Array, w: jax.Array, stride: int = 1, padding=0,
                      dtype=jnp.bfloat16) -> jax.Array:
  """`conv2d_matmul` with every tap on the matmul's N: one dot_general of the padded
  input by all kh kw taps (K = Cin, N = kh kw Cout), its shifted output slices summed.

  Same arguments and result as `conv2d_matmul`. It copies no input, but holds kh kw
  outputs' worth of float32 products. In bfloat16 on CPU (AVX-512, ms against
  `conv2d_matmul`) it wins on the transposed convolutions' 2x2 phases from 64x64
  outputs (256->128 at 128x128: 20 against 31; 512->256 at 64x64: 13 against 19),
  not on small grids (3x3 512->512 at 17x17: 6.8 against 6.0). Single 3x3 convs
  win too (64->64 at 256x256: 30 against 49), but the paper anonymize ran about
  10% slower with its 3x3 convs in this form (in-process A/B, 10 calls each) and
  2 to 9% faster with only the kernels of up to 4 taps in it.
  """
  cout = w.shape[3]
  x, w, oh, ow = _as_stride1(x, w, stride, padding, dtype)
  kh, kw, cin = w.shape[:3]
  taps = w.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)  # columns (i, j, o)
  y = jax.lax.dot_general(x[:, :oh + kh - 1, :ow + kw - 1], taps, (((3,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  return _shifted_sum(y, [(i, j) for i in range(kh) for j in range(kw)], oh, ow, cout)


def channel_dot(x: jax.Array, w: jax.Array, precision=None, operand_dtype=None) -> jax.Array:
  """x (..., K) @ w (K, N). `operand_dtype` None: in x's dtype at `precision`;
  else both operands rounded to it and accumulated in float32 (float32 result)."""
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  if operand_dtype is None:
    return jax.lax.dot_general(x, w.astype(x.dtype), dims, precision=precision)
  return jax.lax.dot_general(x.astype(operand_dtype), w.astype(operand_dtype), dims,
                             preferred_element_type=jnp.float32)


def conv1x1(x: jax.Array, w: jax.Array, stride: int = 1, precision=None) -> jax.Array:
  """Unpadded 1x1 convolution as a channel contraction; x (B,H,W,Cin), w (1,1,Cin,Cout).

  Output (B, ceil(H/stride), ceil(W/stride), Cout). XLA's CPU convolution runs
  1x1 kernels at a fraction of its matmul speed (2-8x slower at the decoder's
  and extractor's sizes), so they are written as the matmul they are.
  """
  if stride > 1:
    x = x[:, ::stride, ::stride]
  return channel_dot(x, w[0, 0], precision)


def conv2d_stride2_taps(x: jax.Array, w: jax.Array, padding, precision=None,
                        operand_dtype=None) -> jax.Array:
  """Stride-2 convolution with an even k x k kernel as one matmul per folded tap.

  x (B,H,W,Cin), w (k,k,Cin,Cout), padding ((top, bottom), (left, right)) ->
  (B, oh, ow, Cout) as `lax.conv` gives it. The padded input is folded 2x2 onto
  its channels (`_fold_stride2`); each of the (k/2)^2 folded taps multiplies the
  whole folded grid in one dot_general (K = 4 Cin, N = Cout) and the products
  are summed at their shifts. XLA's CPU convolution runs the pyramid encoder's
  4x4 stride-2 kernels at 55-105 GFLOP/s, these matmuls at 90-125.
  `operand_dtype`: as `channel_dot`'s (the folding stays in x's dtype).
  """
  oh, ow = _conv_out_size(x.shape, w.shape, 2, padding)
  folded, taps = _fold_stride2(x, w.astype(x.dtype), padding, oh, ow)
  out = None
  for a in range(taps.shape[0]):
    for b in range(taps.shape[1]):
      product = channel_dot(folded, taps[a, b], precision,
                            operand_dtype)[:, a:a + oh, b:b + ow]
      out = product if out is None else out + product
  return out


# Winograd transforms (Lavin & Gray, 2016) as (B^T, G, A^T) for F(m x m, r x r):
# input tiles of n = m + r - 1, output tiles of m. In F(2x2, 3x3) and F(2x2, 2x2)
# every coefficient is exact in binary floating point and float32 rounding stays
# at about 1e-6 of the output's largest value. F(4x4, 3x3) interpolates at 0, 1,
# -1, 1/2, -2 and infinity, the points Barabasz et al. (2020) found most accurate
# for it: 5.6e-6 against 1.4e-5 with Lavin & Gray's 0, +-1, +-2 (a 64x64 256->256
# convolution against float64); its input and output transforms are still exact.
WINOGRAD_F2_3 = (((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                 ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
                 ((1, 1, 1, 0), (0, 1, -1, -1)))
WINOGRAD_F2_2 = (((1, -1, 0), (0, 1, 0), (0, -1, 1)),
                 ((1, 0), (1, 1), (0, 1)),
                 ((1, 1, 0), (0, 1, 1)))
WINOGRAD_F4_3 = (((1, -1.5, -2, 1.5, 1, 0), (0, -1, 0.5, 2.5, 1, 0), (0, 1, -2.5, 0.5, 1, 0),
                  (0, -2, -1, 2, 1, 0), (0, 0.5, -1, -0.5, 1, 0), (0, 1, -1.5, -2, 1.5, 1)),
                 ((1, 0, 0), (1 / 3, 1 / 3, 1 / 3), (-1 / 3, 1 / 3, -1 / 3),
                  (-16 / 15, -8 / 15, -4 / 15), (1 / 15, -2 / 15, 4 / 15), (0, 0, 1)),
                 ((1, 1, 1, 1, 1, 0), (0, 1, -1, 0.5, -2, 0), (0, 1, 1, 0.25, 4, 0),
                  (0, 1, -1, 0.125, -8, 1)))


def _combine(coefficients: Sequence[float], arrays: Sequence[jax.Array]) -> jax.Array:
  """sum(c * a) over the nonzero coefficients, +-1 as plain adds and subtracts."""
  out = None
  for c, a in zip(coefficients, arrays):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else c * a
    out = term if out is None else out + term
  return out


def winograd_conv(xp: jax.Array, w: jax.Array, transform, oh: int, ow: int,
                  precision=None, operand_dtype=None) -> jax.Array:
  """Valid stride-1 convolution of an already padded input by Winograd F(m x m, r x r).

  xp (B, >= oh + r - 1, >= ow + r - 1, Cin), w (r,r,Cin,Cout), `transform` one of
  the `WINOGRAD_*` triples; oh and ow multiples of m -> (B,oh,ow,Cout). The n x n
  input tiles at stride m are transformed (B^T d B), the kernel likewise (G g G^T,
  as sums of kernel slices: XLA's einsum form of it cost more than the matmuls at
  the decoder's low resolutions), each of the n^2 transform positions is one
  matmul over all tiles (K = Cin, N = Cout), and every tile's outputs are read
  back (A^T M A): n^2 multiplications per m^2 outputs instead of m^2 r^2.
  `operand_dtype`: as `channel_dot`'s; both transforms and the read-back stay
  in xp's dtype, so only the transformed tiles and kernel are rounded.
  """
  bt, g, at = transform
  n, m, r = len(bt), len(at), len(g[0])
  b, th, tw = xp.shape[0], oh // m, ow // m
  rows = [xp[:, i:i + m * th:m] for i in range(n)]                      # (B, th, W', Cin)
  tiles = [[_combine(bt[l], [t[:, :, j:j + m * tw:m] for j in range(n)]) for l in range(n)]
           for t in (_combine(bt[k], rows) for k in range(n))]            # (B, th, tw, Cin)
  kernel = [[_combine(g[l], [kr[j] for j in range(r)]) for l in range(n)]
            for kr in (_combine(g[k], [w[i] for i in range(r)]) for k in range(n))]
  products = [[channel_dot(tiles[k][l], kernel[k][l], precision, operand_dtype)
               for l in range(n)] for k in range(n)]
  by_cols = [[_combine(at[q], products[k]) for q in range(m)] for k in range(n)]
  phases = [[_combine(at[p], [by_cols[k][q] for k in range(n)]) for q in range(m)]
            for p in range(m)]                                          # out[m i + p, m j + q]
  out = jnp.stack([jnp.stack(phases[p], axis=3) for p in range(m)], axis=2)
  return out.reshape(b, oh, ow, w.shape[3])


def conv3x3_winograd(x: jax.Array, w: jax.Array, precision=None,
                     transform=WINOGRAD_F2_3, operand_dtype=None) -> jax.Array:
  """3x3 stride-1 convolution with padding 1 by Winograd F(m x m, 3x3).

  x (B,H,W,Cin) with H and W multiples of m, w (3,3,Cin,Cout) -> (B,H,W,Cout),
  as `lax.conv` gives it to float32 rounding. `transform`: WINOGRAD_F2_3 (m = 2,
  16 multiplications per 4 outputs instead of 36) or WINOGRAD_F4_3 (m = 4, 36
  per 16 instead of 144). `operand_dtype`: as `winograd_conv`'s.
  """
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return winograd_conv(xp, w, transform, x.shape[1], x.shape[2], precision, operand_dtype)


def conv4x4_stride2_winograd(x: jax.Array, w: jax.Array, padding, precision=None,
                             operand_dtype=None) -> jax.Array:
  """4x4 stride-2 convolution by Winograd F(2x2, 2x2) on the folded input.

  x (B,H,W,Cin), w (4,4,Cin,Cout), padding ((top, bottom), (left, right)) whose
  output sides are even -> (B, oh, ow, Cout) as `lax.conv` gives it to float32
  rounding. `_fold_stride2` turns it into a 2x2 stride-1 convolution on 4 Cin
  channels, which takes 9 multiplications per 4 outputs instead of 16.
  `operand_dtype`: as `winograd_conv`'s.
  """
  oh, ow = _conv_out_size(x.shape, w.shape, 2, padding)
  if w.shape[:2] != (4, 4) or oh % 2 or ow % 2:
    raise ValueError(f"conv4x4_stride2_winograd takes 4x4 kernels with even output sides, "
                     f"got kernel {w.shape[:2]} and output {oh}x{ow}")
  folded, kernel = _fold_stride2(x, w.astype(x.dtype), padding, oh, ow)
  return winograd_conv(folded, kernel, WINOGRAD_F2_2, oh, ow, precision, operand_dtype)


def conv2x2_winograd(x: jax.Array, w: jax.Array, padding, precision=None) -> jax.Array:
  """2x2 stride-1 convolution by Winograd F(2x2, 2x2) (9 multiplications per 4 outputs
  instead of 16).

  x (B,H,W,Cin), w (2,2,Cin,Cout), padding ((top, bottom), (left, right)), all >= 0
  -> (B, oh, ow, Cout) as `lax.conv` gives it to float32 rounding. Odd output sides
  are computed one row or column longer (more zero padding) and cropped.
  """
  (pt, pb), (pl, pr) = padding
  oh, ow = _conv_out_size(x.shape, w.shape, 1, padding)
  eh, ew = oh % 2, ow % 2
  xp = jnp.pad(x, ((0, 0), (pt, pb + eh), (pl, pr + ew), (0, 0)))
  out = winograd_conv(xp, w.astype(x.dtype), WINOGRAD_F2_2, oh + eh, ow + ew, precision)
  return out[:, :oh, :ow]


# When `conv_general_dilated` lowers for CPU, some convolution shapes run as
# matmuls, from what XLA's CPU convolutions measured against them (single
# convolutions, batch 1, ms; "AVX2": 2 AVX2-only cores, "AVX-512": 2 AVX-512
# EPYC cores). The rules favour the AVX-512 figures where the two disagree,
# since they lose little on AVX2:
# - 4x4 stride-2 kernels on >= 128 input channels with even output sides over
#   >= 256 output tiles of 2x2 (`conv4x4_stride2_winograd`), against the taps
#   form below: 256x256 128->256 182 against 205 (AVX2), 78 against 100
#   (AVX-512); 128x128 256->512 103 against 187, 63 against 96; 64x64 512->512
#   (256 tiles) 32 against 46 (AVX-512), where the AVX2 record (79 / 84) counted
#   it a loss; with 64 tiles (32x32 in) the 2.25x larger transformed kernel costs
#   more than it saves (39 against 22, 17 against 13).
# - other stride-2 even kernels on >= 128 input channels (`conv2d_stride2_taps`):
#   the pyramid encoder's 4x4 convs + instance norm + lReLU took 247 against 348
#   ms at 256x256 128->256 and 72 against 98 ms at 64x64 512->512 (AVX2); with 64
#   input channels they lose (256x256 64->128: 70 against 46 ms).
# - 3x3 padding-1 stride-1 kernels on >= 128 input channels over >= 64 output
#   tiles (`conv3x3_winograd`): 128x128 256->256 136 against 176 (AVX2), 56 to 64
#   against 95 (AVX-512); 64x64 512->512 115 against 164, 46 against 93; 32x32
#   512->512 23 against 47; 16x16 8 against 13; with 128 channels 256x256 76 to 80
#   against 96 and 128x128 17 against 24 (AVX-512), but 207 against 202 at
#   256x256 (AVX2); with 16 tiles (8x8) it is even or loses, and with 64 channels
#   it is even (256x256: 24 against 24, AVX-512).
# - of those, the ones on >= 256 input channels whose sides are multiples of 4
#   over >= 256 output tiles of 4x4 take F(4x4, 3x3) instead (AVX-512, best of
#   15, against F(2x2, 3x3)): 128x128 256->256 57 against 63, 64x64 512->512 42
#   against 48, 4x32x32 512->512 39 against 51; with 64 tiles (32x32) it is even
#   (14 against 14) and with 16 (16x16) it loses (9 against 5); with 128 channels
#   it is even (Lavin & Gray's points, 256x256: 89 against 92, 128x128: 23
#   against 22).
# Other platforms keep `lax.conv`.
_MATMUL_MIN_IN_FEATURES = 128
_WINOGRAD3_MIN_IN_FEATURES = 128
_WINOGRAD3_MIN_TILES = 64
_WINOGRAD4_MIN_IN_FEATURES = 256
_WINOGRAD4_MIN_TILES = 256
_WINOGRAD_STRIDE2_MIN_TILES = 256
_TAP_MATMUL_MIN_OUTPUTS = 64 * 64  # bfloat16 `conv2d_tap_matmul`, see there
_TAP_MATMUL_MAX_TAPS = 4
# Within `hoisted_cpu_forms` the kernel transforms cost nothing per call, and the
# float32 Winograd forms win on smaller grids (single convs, kernels prepared
# once, AVX-512, best of 15, ms): 3x3 512->512 F(4x4, 3x3) at 32x32 (64 tiles)
# 9.6 against 12.0 for F(2x2, 3x3), which stays ahead at 16x16 (3.9 against 4.5)
# and takes 8x8 (1.3 to 1.8 against 2.8 to 4.0 for `lax.conv`; at 4x4 1.0
# against 0.6); 4x4 stride-2 512->512 F(2x2, 2x2) from 32x32 in (8.6 against
# 12.5 for the taps) and 16x16 (3.7 against 4.5), `lax.conv` at 8x8 (1.8 to 2.7
# against 2.4 to 3.1 for the taps); the transposed convs' 2x2 phases F(2x2, 2x2)
# (`conv2x2_winograd`): 22 against 31 at 128x128 256->128, 15 against 24 at
# 64x64 512->256, 7.3 against 11.3 at 32x32, 2.6 against 3.2 at 16x16, even at
# 8x8 and a loss at 4x4. ArcFace's 3x3 256->256 convs at 14x14 (49 tiles):
# F(2x2, 3x3) 1.1 against 2.6 for `lax.conv`.
_HOISTED_WINOGRAD4_MIN_TILES = 64
_HOISTED_WINOGRAD3_MIN_TILES = 16
_HOISTED_WINOGRAD_STRIDE2_MIN_TILES = 16
_HOISTED_WINOGRAD2_MIN_TILES = 64


_hoisted_cpu_trace = False


@contextlib.contextmanager
def hoisted_cpu_forms():
  """Within it, convolutions are traced for a CPU program whose kernel-only work is
  done once (`hoist`): the CPU forms directly, not behind `jax.lax.platform_dependent`
  (so no other platform's branch is in the program), picked for kernel transforms
  that cost nothing per call (`_HOISTED_*`). Not for functions whose trace a
  `jax.jit` caches: the cache does not know of this setting."""
  global _hoisted_cpu_trace
  previous, _hoisted_cpu_trace = _hoisted_cpu_trace, True
  try:
    yield
  finally:
    _hoisted_cpu_trace = previous


def _by_platform(x: jax.Array, w: jax.Array, cpu, default) -> jax.Array:
  """cpu(x, w) on CPU, default(x, w) elsewhere (chosen when lowering, or now within
  `hoisted_cpu_forms`)."""
  if _hoisted_cpu_trace:
    return cpu(x, w)
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=default)


def _cpu_matmul_form(x_shape, w_shape, strides, padding, operand_dtype=None):
  """The matmul form `conv_general_dilated` uses on CPU for this convolution, or None.

  It is called as form(x, w, precision). With a bfloat16 `operand_dtype` the
  forms round their matmul operands to it (`_conv2d_low_precision`). Rounding
  transformed operands costs more than rounding the plain ones, since the
  read-back adds up products larger than the outputs: relative errors against
  float64 (random data, AVX-512, ms against the direct `conv2d_matmul`):
  F(2x2, 3x3) 3.9e-3 against 2.35e-3, at 38 against 81 ms (128x128 256->256)
  and 28 against 61 (64x64 512->512); F(2x2, 2x2) for 4x4 stride 2 4.7e-3
  against 2.35e-3, at 39 against 73 ms (128x128 256->512). F(4x4, 3x3) is left
  out: 1.6e-2. Within `hoisted_cpu_forms` float32 convolutions follow the
  `_HOISTED_*` rules instead.
  """
  kh, kw, cin = w_shape[:3]
  b, h, wd = x_shape[:3]
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  hoisted = _hoisted_cpu_trace and operand_dtype is None
  if (strides == (2, 2) and kh == kw and kh % 2 == 0 and cin >= _MATMUL_MIN_IN_FEATURES
      and all(p >= 0 for pair in padding for p in pair)):
    oh, ow = _conv_out_size(x_shape, w_shape, 2, padding)
    min_tiles = _HOISTED_WINOGRAD_STRIDE2_MIN_TILES if hoisted else _WINOGRAD_STRIDE2_MIN_TILES
    if kh == 4 and oh % 2 == 0 and ow % 2 == 0 and b * (oh // 2) * (ow // 2) >= min_tiles:
      return lambda x, w, precision: conv4x4_stride2_winograd(x, w, padding, precision,
                                                              operand_dtype)
    if hoisted and kh == 4:
      return None
    return lambda x, w, precision: conv2d_stride2_taps(x, w, padding, precision, operand_dtype)
  if strides == (1, 1) and (kh, kw) == (3, 3) and padding == ((1, 1), (1, 1)):
    min_tiles4 = _HOISTED_WINOGRAD4_MIN_TILES if hoisted else _WINOGRAD4_MIN_TILES
    min_tiles2 = _HOISTED_WINOGRAD3_MIN_TILES if hoisted else _WINOGRAD3_MIN_TILES
    if (operand_dtype is None and h % 4 == 0 and wd % 4 == 0
        and cin >= _WINOGRAD4_MIN_IN_FEATURES and b * (h // 4) * (wd // 4) >= min_tiles4):
      return lambda x, w, precision: conv3x3_winograd(x, w, precision, WINOGRAD_F4_3)
    if (h % 2 == 0 and wd % 2 == 0 and cin >= _WINOGRAD3_MIN_IN_FEATURES
        and b * (h // 2) * (wd // 2) >= min_tiles2):
      return lambda x, w, precision: conv3x3_winograd(x, w, precision, WINOGRAD_F2_3,
                                                      operand_dtype)
  if (hoisted and strides == (1, 1) and (kh, kw) == (2, 2) and cin >= _MATMUL_MIN_IN_FEATURES
      and all(p >= 0 for pair in padding for p in pair)):
    oh, ow = _conv_out_size(x_shape, w_shape, 1, padding)
    if b * ((oh + 1) // 2) * ((ow + 1) // 2) >= _HOISTED_WINOGRAD2_MIN_TILES:
      return lambda x, w, precision: conv2x2_winograd(x, w, padding, precision)
  return None


def _is_1x1_unpadded(w_shape, padding) -> bool:
  return tuple(w_shape[:2]) == (1, 1) and all(p == 0 for pair in padding for p in pair)


def _conv2d_low_precision(x: jax.Array, w: jax.Array, stride: int, padding, dtype) -> jax.Array:
  """`conv2d` with `dtype` matmul operands and float32 accumulation and result. On CPU:
  the `_cpu_matmul_form` for the shape (its transforms in float32), or else
  `conv2d_tap_matmul` for kernels of up to `_TAP_MATMUL_MAX_TAPS` taps over at
  least `_TAP_MATMUL_MIN_OUTPUTS` output pixels; everywhere else `conv2d_matmul`."""
  padding = tuple(tuple(p) for p in padding)

  def direct(x, w):
    return conv2d_matmul(x, w, stride, padding, dtype)

  oh, ow = _conv_out_size(x.shape, w.shape, stride, padding)
  form = _cpu_matmul_form(x.shape, w.shape, (stride, stride), padding, dtype)
  if form is not None:
    def on_cpu(x, w):
      return form(x.astype(jnp.float32), w.astype(jnp.float32), None)
  elif (x.shape[0] * oh * ow >= _TAP_MATMUL_MIN_OUTPUTS
        and w.shape[0] * w.shape[1] <= _TAP_MATMUL_MAX_TAPS):
    def on_cpu(x, w):
      return conv2d_tap_matmul(x, w, stride, padding, dtype)
  else:
    return direct(x, w)
  return _by_platform(x, w, on_cpu, direct)


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding=0, dtype=None) -> jax.Array:
  """Plain convolution (cross-correlation, as PyTorch); x (B,H,W,Cin), w (kh,kw,Cin,Cout).

  `dtype` None: x's dtype through `conv_general_dilated` (`lax.conv`, or a matmul
  form where it picks one); bfloat16: bfloat16 matmul operands, float32
  accumulation and result (`_conv2d_low_precision`).
  """
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  if dtype is not None:
    return _conv2d_low_precision(x, w, stride, padding, dtype)
  return conv_general_dilated(x, w.astype(x.dtype), (stride, stride), padding,
                              dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _nhwc_plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count) -> bool:
  """Whether a `lax.conv_general_dilated` call is an NHWC/HWIO convolution with
  explicit padding, one stride and no dilation or groups."""
  strides = tuple(window_strides)
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  return (dimension_numbers is not None
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
          and feature_group_count == 1
          and all(d == 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
          and not isinstance(padding, str) and len(set(strides)) == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None) -> jax.Array:
  """`lax.conv_general_dilated` (for `flax.linen.Conv`) with some NHWC cases as matmuls:
  unpadded 1x1 kernels on every platform (`conv1x1`), and on CPU the shapes
  `_cpu_matmul_form` picks (chosen when lowering, `jax.lax.platform_dependent`).
  Every other convolution goes to `lax` unchanged."""
  def by_lax(lhs, rhs):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)

  if _nhwc_plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count):
    if _is_1x1_unpadded(rhs.shape, padding):
      return conv1x1(lhs, rhs, window_strides[0], precision)
    cpu_form = _cpu_matmul_form(lhs.shape, rhs.shape, window_strides, padding)
    if cpu_form is not None:
      return _by_platform(lhs, rhs, lambda x, w: cpu_form(x, w, precision), by_lax)
  return by_lax(lhs, rhs)


def conv_general_dilated_bf16(lhs, rhs, window_strides, padding, lhs_dilation=None,
                              rhs_dilation=None, dimension_numbers=None,
                              feature_group_count=1, precision=None) -> jax.Array:
  """`lax.conv_general_dilated`'s signature (for `flax.linen.Conv`) computed by
  `conv2d` with bfloat16 operands and a float32 result: NHWC/HWIO, square stride 1
  or 2, explicit padding, no dilation or groups."""
  del precision
  if not _nhwc_plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count):
    raise ValueError("conv_general_dilated_bf16 takes NHWC/HWIO convolutions with explicit "
                     "padding, one stride and no dilation or groups")
  return conv2d(lhs, rhs, window_strides[0], padding, jnp.bfloat16)


def _conv_transpose2x_phases(x: jax.Array, w: jax.Array, dtype=None) -> list[list[jax.Array]]:
  """The four sub-pixel phases of `conv_transpose2x`: grid[py][px][:, m, n] = out[:, 2m+py, 2n+px].

  Each phase is an ordinary stride-1 convolution of x with the taps that land
  on it (output pixel 2m + p gathers taps i = p + 2t from input pixel m - t),
  computed by `conv2d` with `dtype`.
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
      row.append(conv2d(x, sub, padding=((th - 1, th - 1), (tw - 1, tw - 1)), dtype=dtype))
    grid.append(row)
  return grid


def conv_transpose2x(x: jax.Array, w: jax.Array, dtype=None) -> jax.Array:
  """PyTorch `conv_transpose2d(stride=2, padding=0)`; x (B,H,W,Cin), w (k,k,Cin,Cout).

  Output (B, 2H + k - 2, 2W + k - 2, Cout). `w[i, j]` is the tap that PyTorch
  indexes `weight[:, :, i, j]`. Written as four sub-pixel phases, each an
  ordinary stride-1 convolution of the input with a subset of the taps: no
  multiplications by inserted zeros, and every phase runs at convolution speed.
  `dtype`: as `conv2d`'s (bfloat16: matmul form, float32 result).
  """
  k = w.shape[0]
  b, h, wd, _ = x.shape
  grid = _conv_transpose2x_phases(x, w, dtype)
  ph, pw = h + (k + 1) // 2 - 1, wd + (k + 1) // 2 - 1
  grid = [[jnp.pad(p, ((0, 0), (0, ph - p.shape[1]), (0, pw - p.shape[2]), (0, 0))) for p in row]
          for row in grid]
  return _interleave(grid)[:, :2 * h + k - 2, :2 * wd + k - 2]


def conv_transpose2x_fir(x: jax.Array, w: jax.Array, taps: np.ndarray, pad,
                         dtype=None) -> jax.Array:
  """`upfirdn2d(conv_transpose2x(x, w), taps, pad=pad)` computed on the sub-pixel phases.

  x (B,H,W,Cin), w (k,k,Cin,Cout), `taps` the separable 1-D FIR factor. The
  filter runs on each phase at input resolution and the phases are interleaved
  once at the end, so the (2H + k - 2)-sized transposed-conv output is never
  formed. Falls back to the two-step form when an output side is odd. `dtype`:
  as `conv2d`'s; the filter runs on the phases' dtype (float32 for bfloat16).
  """
  taps = np.asarray(taps, np.float32)
  py0, py1, px0, px1 = _pads(pad)
  k = w.shape[0]
  oh = _upfirdn_out_len(2 * x.shape[1] + k - 2, len(taps), 1, 1, py0, py1)
  ow = _upfirdn_out_len(2 * x.shape[2] + k - 2, len(taps), 1, 1, px0, px1)
  if oh <= 0 or ow <= 0 or oh % 2 or ow % 2:
    return upfirdn2d(conv_transpose2x(x, w, dtype), taps, pad=pad)
  grid = _conv_transpose2x_phases(x, w, dtype)
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
  leading axes of a 3x3x512x512 kernel takes about 20 ms, the unrolled sum 0.3 ms.
  """
  kh, kw = w.shape[:2]
  return sum(jnp.square(w[i, j]) for i in range(kh) for j in range(kw))


def nchw_flatten_order(c: int, h: int, w: int) -> np.ndarray:
  """Index map from an NHWC flatten to PyTorch's NCHW flatten of a (C, H, W) map.

  `nhwc_features = nchw_features[..., nchw_flatten_order(c, h, w)]`: used to
  permute the input rows of a linear layer that reads a flattened feature map.
  """
  return np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).reshape(-1)
