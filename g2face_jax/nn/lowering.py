"""How convolutions are lowered: XLA's own convolution, or matrix-product forms.

XLA's CPU convolutions run some of the model's shapes well below its matmul
rate, so on CPU those shapes are computed as matrix products instead: unpadded
1x1 kernels as channel contractions, stride-2 even kernels folded 2x2 onto the
channels (`conv2d_stride2_taps`), and Winograd F(2x2, 3x3), F(4x4, 3x3) and
F(2x2, 2x2) forms (`conv3x3_winograd`, `conv4x4_stride2_winograd`). A bfloat16
option computes convolutions on bfloat16 operands with float32 accumulation
(`conv2d_matmul`, `conv2d_tap_matmul`), since XLA's CPU bfloat16 matmuls are
fast where its bfloat16 convolutions are not.

Which form a convolution takes is the caller's choice, made by the `Lowering`
policy it passes (`Lowering.conv2d`, `Lowering.conv_general_dilated`): its
operand dtype, and the `CpuRules` table of shapes that take a matmul form on
CPU (None: XLA's convolution everywhere). The CPU branch is chosen when JAX
lowers for a platform (`jax.lax.platform_dependent`), so GPUs and TPUs keep
XLA's convolutions in the same program. docs/cpu_convolutions.md has the
measurements behind the table.

Every form takes NHWC inputs (B, H, W, Cin) and HWIO kernels (kh, kw, Cin,
Cout), and equals `lax.conv` to float32 rounding (tests/test_ops.py).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp

MATMUL_DTYPES = types.MappingProxyType({"float32": None, "bfloat16": jnp.bfloat16})


def matmul_dtype(dtype) -> Any:
  """The convolution operand dtype a `dtype` option names: None for float32 (the
  default path, in the input's dtype), bfloat16 for the matmul form.

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
  stacked copy of the input. Stride 2 becomes stride 1 on the space-to-depth
  input. XLA's CPU bfloat16 matmuls run at about twice the float32 rate while
  its bfloat16 convolutions do not.
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
  outputs' worth of float32 products, so it pays on kernels of few taps over
  large grids (`CpuRules.tap_matmul_*`).
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
  1x1 kernels at a fraction of its matmul speed, so they are written as the
  matmul they are.
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
  are summed at their shifts.
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
# every coefficient is exact in binary floating point. F(4x4, 3x3) interpolates
# at 0, 1, -1, 1/2, -2 and infinity, the points Barabasz et al. (2020) found
# most accurate for it; its input and output transforms are still exact.
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
  as sums of kernel slices), each of the n^2 transform positions is one
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


@dataclasses.dataclass(frozen=True)
class CpuRules:
  """Which convolution shapes take a matmul form on CPU: the one table of thresholds.

  Tiles count over the whole batch (B * tiles per image). Shapes outside every
  rule keep XLA's convolution.
  """
  # 3x3 stride-1 padding-1 kernels: Winograd F(2x2, 3x3)
  winograd3_min_in_features: int = 128
  winograd3_min_tiles: int = 64        # 2x2 output tiles
  # ... F(4x4, 3x3) instead, on wide inputs over many tiles (float32 only)
  winograd4_min_in_features: int = 256
  winograd4_min_tiles: int = 256       # 4x4 output tiles
  # stride-2 even kernels: folded taps (`conv2d_stride2_taps`), 4x4 ones by F(2x2, 2x2)
  stride2_min_in_features: int = 128
  winograd_stride2_min_tiles: int = 256  # 2x2 output tiles
  # bfloat16 operands: every tap on the matmul's N (`conv2d_tap_matmul`)
  tap_matmul_min_outputs: int = 64 * 64
  tap_matmul_max_taps: int = 4


CPU_RULES = CpuRules()


def _cpu_form(x_shape, w_shape, strides, padding, operand_dtype, rules: CpuRules):
  """The matmul form `rules` give this convolution on CPU, called as form(x, w,
  precision), or None for XLA's convolution.

  With bfloat16 operands F(4x4, 3x3) is never taken: its transformed operands
  lose too much when rounded.
  """
  kh, kw, cin = w_shape[:3]
  b, h, wd = x_shape[:3]
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  if (strides == (2, 2) and kh == kw and kh % 2 == 0 and cin >= rules.stride2_min_in_features
      and all(p >= 0 for pair in padding for p in pair)):
    oh, ow = _conv_out_size(x_shape, w_shape, 2, padding)
    if (kh == 4 and oh % 2 == 0 and ow % 2 == 0
        and b * (oh // 2) * (ow // 2) >= rules.winograd_stride2_min_tiles):
      return lambda x, w, precision: conv4x4_stride2_winograd(x, w, padding, precision,
                                                              operand_dtype)
    return lambda x, w, precision: conv2d_stride2_taps(x, w, padding, precision, operand_dtype)
  if strides == (1, 1) and (kh, kw) == (3, 3) and padding == ((1, 1), (1, 1)):
    if (operand_dtype is None and h % 4 == 0 and wd % 4 == 0
        and cin >= rules.winograd4_min_in_features
        and b * (h // 4) * (wd // 4) >= rules.winograd4_min_tiles):
      return lambda x, w, precision: conv3x3_winograd(x, w, precision, WINOGRAD_F4_3)
    if (h % 2 == 0 and wd % 2 == 0 and cin >= rules.winograd3_min_in_features
        and b * (h // 2) * (wd // 2) >= rules.winograd3_min_tiles):
      return lambda x, w, precision: conv3x3_winograd(x, w, precision, WINOGRAD_F2_3,
                                                      operand_dtype)
  return None


def _on_cpu(x: jax.Array, w: jax.Array, cpu, default) -> jax.Array:
  """cpu(x, w) in programs lowered for CPU, default(x, w) for every other platform."""
  return jax.lax.platform_dependent(x, w, cpu=cpu, default=default)


def _is_1x1_unpadded(w_shape, padding) -> bool:
  return tuple(w_shape[:2]) == (1, 1) and all(p == 0 for pair in padding for p in pair)


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


@dataclasses.dataclass(frozen=True)
class Lowering:
  """How a caller's convolutions are computed (hashable: modules and jitted
  functions can hold it).

  operand_dtype: None, convolutions in the input's dtype (float32: the official
    computation); jnp.bfloat16, matmul forms on bfloat16 operands with float32
    accumulation and a float32 result.
  cpu_rules: the shapes that take a matmul form in programs lowered for CPU;
    None keeps XLA's convolution there too. Other platforms always keep XLA's
    convolution in float32, and run bfloat16 through `conv2d_matmul`.
  """
  operand_dtype: Any = None
  cpu_rules: CpuRules | None = CPU_RULES

  def conv2d(self, x: jax.Array, w: jax.Array, stride: int = 1, padding=0,
             precision=None) -> jax.Array:
    """Convolution (cross-correlation, as PyTorch); x (B,H,W,Cin), w (kh,kw,Cin,Cout),
    padding an int or ((top, bottom), (left, right)) -> (B,H',W',Cout)."""
    if isinstance(padding, int):
      padding = ((padding, padding), (padding, padding))
    padding = tuple(tuple(p) for p in padding)
    if self.operand_dtype is not None:
      return self._low_precision(x, w, stride, padding)
    return self.conv_general_dilated(x, w.astype(x.dtype), (stride, stride), padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)

  def _low_precision(self, x, w, stride: int, padding) -> jax.Array:
    """`conv2d` with `operand_dtype` operands, float32 accumulation and result: on CPU
    the rules' form for the shape (transforms in float32), or else `conv2d_tap_matmul`
    for kernels of few taps over large grids; elsewhere `conv2d_matmul`."""
    dtype = self.operand_dtype

    def direct(x, w):
      return conv2d_matmul(x, w, stride, padding, dtype)

    rules = self.cpu_rules
    if rules is None:
      return direct(x, w)
    oh, ow = _conv_out_size(x.shape, w.shape, stride, padding)
    form = _cpu_form(x.shape, w.shape, (stride, stride), padding, dtype, rules)
    if form is not None:
      def cpu(x, w):
        return form(x.astype(jnp.float32), w.astype(jnp.float32), None)
    elif (x.shape[0] * oh * ow >= rules.tap_matmul_min_outputs
          and w.shape[0] * w.shape[1] <= rules.tap_matmul_max_taps):
      def cpu(x, w):
        return conv2d_tap_matmul(x, w, stride, padding, dtype)
    else:
      return direct(x, w)
    return _on_cpu(x, w, cpu, direct)

  def conv_general_dilated(self, lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           precision=None) -> jax.Array:
    """`lax.conv_general_dilated`'s signature (for `flax.linen.Conv`).

    float32 operands: unpadded 1x1 NHWC kernels as matmuls on every platform
    (`conv1x1`), the `cpu_rules` shapes as their matmul form on CPU, every other
    convolution by `lax` unchanged. bfloat16 operands: `conv2d` with them, for
    NHWC/HWIO convolutions with explicit padding, one stride and no dilation or
    groups (others are a ValueError).
    """
    plain = _nhwc_plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count)
    if self.operand_dtype is not None:
      if not plain:
        raise ValueError("bfloat16 convolutions take NHWC/HWIO kernels with explicit padding, "
                         "one stride and no dilation or groups")
      return self.conv2d(lhs, rhs, window_strides[0], padding)

    def by_lax(lhs, rhs):
      return jax.lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
          rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
          feature_group_count=feature_group_count, precision=precision)

    if plain:
      if _is_1x1_unpadded(rhs.shape, padding):
        return conv1x1(lhs, rhs, window_strides[0], precision)
      if self.cpu_rules is not None:
        form = _cpu_form(lhs.shape, rhs.shape, window_strides, padding, None, self.cpu_rules)
        if form is not None:
          return _on_cpu(lhs, rhs, lambda x, w: form(x, w, precision), by_lax)
    return by_lax(lhs, rhs)


DEFAULT = Lowering()


def for_dtype(dtype) -> Lowering:
  """The default policy with the operands a module's `dtype` option names (None,
  'float32' or 'bfloat16')."""
  return Lowering(operand_dtype=matmul_dtype(dtype))
