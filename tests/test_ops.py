"""StyleGAN2 ops against plain NumPy references."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax.nn import ops, stylegan


def upfirdn2d_numpy(x, kernel, up, down, pad):
  """Loop form of the official upfirdn2d on NHWC: zero-insert, pad/crop, convolve, keep every down-th."""
  py0, py1, px0, px1 = pad
  b, h, w, c = x.shape
  u = np.zeros((b, h * up, w * up, c), np.float64)
  u[:, ::up, ::up] = x
  u = np.pad(u, ((0, 0), (max(py0, 0), max(py1, 0)), (max(px0, 0), max(px1, 0)), (0, 0)))
  u = u[:, max(-py0, 0):u.shape[1] - max(-py1, 0), max(-px0, 0):u.shape[2] - max(-px1, 0)]
  kh, kw = kernel.shape
  flipped = kernel[::-1, ::-1]
  oh, ow = u.shape[1] - kh + 1, u.shape[2] - kw + 1
  out = np.zeros((b, oh, ow, c))
  for i, j in itertools.product(range(kh), range(kw)):
    out += flipped[i, j] * u[:, i:i + oh, j:j + ow]
  return out[:, ::down, ::down]


def conv_transpose_numpy(x, w):
  """PyTorch conv_transpose2d(stride=2, padding=0) as a scatter loop; w (k,k,Cin,Cout)."""
  b, h, wd, _ = x.shape
  k = w.shape[0]
  out = np.zeros((b, 2 * h + k - 2, 2 * wd + k - 2, w.shape[3]))
  for m, n in itertools.product(range(h), range(wd)):
    out[:, 2 * m:2 * m + k, 2 * n:2 * n + k] += np.einsum("bi,hwio->bhwo", x[:, m, n], w)
  return out


RNG = np.random.default_rng(0)


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1, 1, 1)), (2, 1, (2, 1, 2, 1)),
                                         (1, 2, (2, 2, 2, 2)), (1, 2, (1, 1, 1, 1)),
                                         (2, 2, (-1, 3, 0, 2)), (3, 1, (1, 2, 0, 3)),
                                         (2, 1, (1, 1, 1, 1)), (2, 1, (-1, 2, 0, 1))])
def test_upfirdn2d_matches_numpy(up, down, pad):
  x = RNG.standard_normal((2, 7, 9, 3)).astype(np.float32)
  taps = ops.fir_taps([1, 3, 3, 1], up ** 2)
  kernel = np.outer(taps, taps)
  ref = upfirdn2d_numpy(x, kernel, up, down, pad)
  np.testing.assert_allclose(ops.upfirdn2d(x, taps, up, down, pad), ref, rtol=0, atol=1e-5)
  np.testing.assert_allclose(ops.upfirdn2d_reference(x, kernel, up, down, pad), ref, rtol=0, atol=1e-5)


def test_upfirdn2d_reference_takes_any_kernel():
  x = RNG.standard_normal((1, 6, 6, 2)).astype(np.float32)
  kernel = RNG.standard_normal((3, 2)).astype(np.float32)  # not separable, not symmetric
  ref = upfirdn2d_numpy(x, kernel, 2, 1, (1, 0, 2, 1))
  np.testing.assert_allclose(ops.upfirdn2d_reference(x, kernel, 2, 1, (1, 0, 2, 1)), ref, atol=1e-5)


def test_fir_kernels_are_the_official_make_kernel():
  k = np.array([1, 3, 3, 1], np.float32)
  official = np.outer(k, k) / np.outer(k, k).sum() * 4
  np.testing.assert_allclose(ops.fir_kernel_2d(k, 4), official, rtol=1e-7)
  taps = ops.fir_taps(k, 4)
  np.testing.assert_allclose(np.outer(taps, taps), official, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_conv_transpose2x_fast_and_reference_match_numpy(k):
  x = RNG.standard_normal((2, 5, 6, 4)).astype(np.float32)
  w = RNG.standard_normal((k, k, 4, 3)).astype(np.float32)
  ref = conv_transpose_numpy(x, w)
  np.testing.assert_allclose(ops.conv_transpose2x(x, w), ref, atol=1e-4)
  np.testing.assert_allclose(ops.conv_transpose2x_reference(x, w), ref, atol=1e-4)


@pytest.mark.parametrize("k,pad", [(3, (1, 1)), (3, (2, 1)), (4, (0, 1, 2, 1)), (2, (1, 1))])
def test_conv_transpose2x_fir_is_conv_transpose_then_blur(k, pad):
  """The phase-domain fused form against the two plain reference ops and the NumPy loops."""
  x = RNG.standard_normal((2, 5, 6, 4)).astype(np.float32)
  w = RNG.standard_normal((k, k, 4, 3)).astype(np.float32)
  taps = ops.fir_taps([1, 3, 3, 1], 4.0)
  pads = ops._pads(pad)
  ref = upfirdn2d_numpy(conv_transpose_numpy(x, w), np.outer(taps, taps), 1, 1, pads)
  plain = ops.upfirdn2d_reference(ops.conv_transpose2x_reference(x, w), np.outer(taps, taps),
                                  pad=pads)
  out = ops.conv_transpose2x_fir(x, w, taps, pad)
  assert out.shape == ref.shape
  np.testing.assert_allclose(plain, ref, atol=1e-4)
  np.testing.assert_allclose(out, ref, atol=1e-4)


def test_instance_norm_matches_numpy():
  x = RNG.standard_normal((2, 5, 5, 3)).astype(np.float32) * 3 + 1
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(ops.instance_norm(x), (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)


def test_minibatch_stddev_groups_like_official():
  x = RNG.standard_normal((8, 3, 3, 5)).astype(np.float32)
  out = np.asarray(stylegan.minibatch_stddev(x, 4))
  for b in range(8):
    mates = x[[j for j in range(8) if j % 2 == b % 2]]  # G = 4, B/G = 2
    expected = np.sqrt(mates.var(axis=0) + 1e-8).mean()
    np.testing.assert_allclose(out[b, ..., -1], expected, rtol=1e-5)
  np.testing.assert_array_equal(out[..., :5], x)


def _modconv_numpy(x, style_vec, weight, demodulate, up, down):
  """The official grouped form: one modulated (and demodulated) kernel per sample."""
  cin, k = weight.shape[2], weight.shape[0]
  outs = []
  for b in range(x.shape[0]):
    w = weight / np.sqrt(cin * k * k) * style_vec[b][None, None, :, None]
    if demodulate:
      w = w / np.sqrt((w ** 2).sum(axis=(0, 1, 2)) + 1e-8)
    xb = x[b:b + 1]
    taps = ops.fir_taps([1, 3, 3, 1])
    if up:
      o = conv_transpose_numpy(xb, w)
      o = upfirdn2d_numpy(o, np.outer(taps, taps) * 4, 1, 1, (1, 1, 1, 1))
    else:
      if down:
        xb = upfirdn2d_numpy(xb, np.outer(taps, taps), 1, 1, (2, 2, 2, 2))
      p = 0 if down else k // 2
      xp = np.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))
      oh, ow = xp.shape[1] - k + 1, xp.shape[2] - k + 1
      o = np.zeros((1, oh, ow, w.shape[3]))
      for i, j in itertools.product(range(k), range(k)):
        o += np.einsum("bhwi,io->bhwo", xp[:, i:i + oh, j:j + ow], w[i, j])
      if down:
        o = o[:, ::2, ::2]
    outs.append(o)
  return np.concatenate(outs)


@pytest.mark.parametrize("demodulate,up,down,k", [(True, False, False, 3), (False, False, False, 1),
                                                 (True, True, False, 3), (True, False, True, 3)])
def test_modulated_conv_equals_per_sample_kernels(demodulate, up, down, k):
  x = RNG.standard_normal((3, 8, 8, 4)).astype(np.float32)
  style = RNG.standard_normal((3, 6)).astype(np.float32)
  layer = stylegan.ModulatedConv(5, k, demodulate=demodulate, upsample=up, downsample=down)
  variables = layer.init(jax.random.key(0), x, style)
  p = variables["params"]
  style_vec = style @ (np.asarray(p["modulation"]["weight"]) / np.sqrt(6)) + np.asarray(p["modulation"]["bias"])
  ref = _modconv_numpy(x, style_vec, np.asarray(p["weight"]), demodulate, up, down)
  out = layer.apply(variables, x, style)
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # One sample alone gives the same result as inside the batch.
  np.testing.assert_allclose(layer.apply(variables, x[1:2], style[1:2]), out[1:2], rtol=1e-5, atol=1e-5)


def test_equal_linear_bias_twice_quirk():
  x = RNG.standard_normal((2, 8)).astype(np.float32)
  once = stylegan.EqualLinear(4, lr_mul=0.01, activation=True)
  twice = stylegan.EqualLinear(4, lr_mul=0.01, activation=True, bias_twice=True)
  params = once.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a + 3.0, params)
  w, b = np.asarray(params["params"]["weight"]), np.asarray(params["params"]["bias"])
  lin = x @ (w * 0.01 / np.sqrt(8))
  lrelu = lambda v: np.where(v > 0, v, 0.2 * v) * np.sqrt(2)
  np.testing.assert_allclose(once.apply(params, x), lrelu(lin + 0.01 * b), rtol=1e-5)
  np.testing.assert_allclose(twice.apply(params, x), lrelu(lin + 0.02 * b), rtol=1e-5)


def conv_numpy(x, w, stride, pad):
  """Cross-correlation loop in float64; x (B,H,W,Cin), w (kh,kw,Cin,Cout), symmetric pad."""
  x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = 0.0
  for i, j in itertools.product(range(kh), range(kw)):
    patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
    out = out + np.einsum("bhwi,io->bhwo", patch, w[i, j])
  return out


@pytest.mark.parametrize("k,stride,pad", [(1, 1, 0), (1, 2, 0), (1, 1, 1), (3, 1, 1), (3, 2, 1)])
def test_conv2d_and_flax_route_match_numpy(k, stride, pad):
  """Unpadded 1x1 kernels take the matmul form (`conv1x1`); the rest stay `lax.conv`.
  Both entry points (`ops.conv2d`, `plain.Conv` through `ops.conv_general_dilated`)
  agree with a float64 loop, odd sizes included."""
  from g2face_jax.nn import plain
  x = RNG.standard_normal((2, 7, 9, 5)).astype(np.float32)
  w = RNG.standard_normal((k, k, 5, 4)).astype(np.float32)
  ref = conv_numpy(x, w, stride, pad)
  np.testing.assert_allclose(ops.conv2d(x, w, stride, pad), ref, rtol=0, atol=1e-5)
  conv = plain.Conv(5, 4, k, stride=stride, padding=pad, use_bias=False)
  got = conv.apply({"params": {"kernel": jnp.asarray(w)}}, x)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
  lowered = jax.jit(lambda v: conv.apply(v, x)).lower({"params": {"kernel": jnp.asarray(w)}})
  assert ("convolution" in lowered.as_text()) == (k > 1 or pad > 0)


@pytest.mark.parametrize("cin,pad", [(128, 1), (128, 0), (5, 1)])
def test_stride2_even_kernels_match_numpy(cin, pad):
  """4x4 stride-2 kernels (the pyramid encoder's) on at least 128 input channels take
  the folded-tap matmuls (`conv2d_stride2_taps`) on CPU at small sizes, narrower ones
  `lax.conv`; both entry points agree with a float64 loop on odd sizes."""
  from g2face_jax.nn import plain
  x = RNG.standard_normal((2, 7, 10, cin)).astype(np.float32)
  w = RNG.standard_normal((4, 4, cin, 6)).astype(np.float32)
  ref = conv_numpy(x, w, 2, pad)
  atol = 1e-5 * np.abs(ref).max()
  np.testing.assert_allclose(ops.conv2d(x, w, 2, pad), ref, rtol=0, atol=atol)
  conv = plain.Conv(cin, 6, 4, stride=2, padding=pad, use_bias=False)
  got = conv.apply({"params": {"kernel": jnp.asarray(w)}}, x)
  np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
  lowered = jax.jit(lambda v: conv.apply(v, x)).trace(
      {"params": {"kernel": jnp.asarray(w)}}).lower(lowering_platforms=("cpu",))
  assert ("convolution" in lowered.as_text()) == (cin < 128)
  np.testing.assert_allclose(ops.conv2d_stride2_taps(x, w, ((pad, pad + 1), (0, pad))),
                             jax.lax.conv_general_dilated(
                                 x, w, (2, 2), ((pad, pad + 1), (0, pad)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")),
                             rtol=0, atol=atol)


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (2, 0)), ((2, 1), (1, 2))])
def test_conv4x4_stride2_winograd_matches_numpy(padding):
  """F(2x2, 2x2) on the folded input against a float64 loop, asymmetric padding included."""
  x = RNG.standard_normal((2, 8, 12, 5)).astype(np.float32)
  w = RNG.standard_normal((4, 4, 5, 7)).astype(np.float32)
  xp = np.pad(x, ((0, 0),) + padding + ((0, 0),))
  ref = conv_numpy(xp, w, 2, 0)
  got = ops.conv4x4_stride2_winograd(x, w, padding)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match="even output"):
    ops.conv4x4_stride2_winograd(x[:, :6], w, ((1, 1), (1, 1)))


@pytest.mark.parametrize("transform,shape,atol", [("WINOGRAD_F2_3", (2, 6, 8, 5), 1e-5),
                                                 ("WINOGRAD_F4_3", (2, 8, 12, 5), 2e-5)])
def test_conv3x3_winograd_matches_numpy(transform, shape, atol):
  """F(2x2, 3x3) and F(4x4, 3x3) against a float64 loop, to float32 rounding."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = RNG.standard_normal((3, 3, shape[3], 7)).astype(np.float32)
  ref = conv_numpy(x, w, 1, 1)
  got = ops.conv3x3_winograd(x, w, transform=getattr(ops, transform))
  np.testing.assert_allclose(got, ref, rtol=0, atol=atol * np.abs(ref).max())


@pytest.mark.parametrize("transform", ["WINOGRAD_F2_3", "WINOGRAD_F2_2", "WINOGRAD_F4_3"])
def test_winograd_transforms_compute_the_correlation(transform):
  """A^T [(G g) * (B^T d)] is the valid correlation of d by g for every (d, g),
  checked in float64 on the basis vectors: the transform triples are exact."""
  bt, g, at = (np.asarray(m, np.float64) for m in getattr(ops, transform))
  m, r = at.shape[0], g.shape[1]
  for d in np.eye(m + r - 1):
    for k in np.eye(r):
      want = np.array([d[i:i + r] @ k for i in range(m)])
      np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), want, rtol=0, atol=1e-12)


def _cpu_and_accelerator_lowerings(fn, *args) -> tuple[str, list[str]]:
  traced = jax.jit(fn).trace(*args)
  return (traced.lower(lowering_platforms=("cpu",)).as_text(),
          [traced.lower(lowering_platforms=(p,)).as_text() for p in ("tpu", "cuda")])


@pytest.mark.parametrize("shape,matmuls", [((1, 16, 16, 128), True), ((1, 64, 64, 64), False),
                                           ((1, 8, 8, 256), False), ((4, 8, 8, 256), True),
                                           ((1, 10, 9, 256), False)])
def test_3x3_convs_take_winograd_on_cpu(shape, matmuls):
  """3x3 convs with even sides on >= 128 channels over >= 64 output tiles lower to
  Winograd matmuls on CPU; the others stay `lax.conv`, as they do on accelerators.
  All match a float64 loop."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = (RNG.standard_normal((3, 3, shape[3], 3)) / np.sqrt(9 * shape[3])).astype(np.float32)
  ref = conv_numpy(x, w, 1, 1)
  np.testing.assert_allclose(ops.conv2d(x, w, 1, 1), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  cpu, accelerators = _cpu_and_accelerator_lowerings(lambda x, w: ops.conv2d(x, w, 1, 1), x, w)
  assert ("convolution" in cpu) == (not matmuls)
  assert all("convolution" in text for text in accelerators)


def _cpu_matmul_dots(shape, kernel: int, stride: int, atol: float) -> int:
  """Checks `ops.conv2d` (padding 1, 2 output channels) on a random input of `shape`
  against a float64 loop, and that it lowers to matmuls on CPU and to `lax.conv` on
  accelerators; returns the number of dots in the CPU lowering."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = (RNG.standard_normal((kernel, kernel, shape[3], 2))
       / np.sqrt(kernel * kernel * shape[3])).astype(np.float32)
  ref = conv_numpy(x, w, stride, 1)
  np.testing.assert_allclose(ops.conv2d(x, w, stride, 1), ref, rtol=0,
                             atol=atol * np.abs(ref).max())
  cpu, accelerators = _cpu_and_accelerator_lowerings(
      lambda x, w: ops.conv2d(x, w, stride, 1), x, w)
  assert "convolution" not in cpu
  assert all("convolution" in text for text in accelerators)
  return cpu.count("stablehlo.dot_general")


@pytest.mark.parametrize("shape,dots", [((1, 64, 64, 256), 36), ((4, 32, 32, 256), 36),
                                        ((1, 32, 32, 256), 16), ((1, 64, 64, 128), 16),
                                        ((1, 66, 66, 256), 16)])
def test_wide_3x3_convs_over_many_tiles_take_winograd_f4_on_cpu(shape, dots):
  """3x3 convs on >= 256 channels with sides multiples of 4 over >= 256 tiles of 4x4
  lower to F(4x4, 3x3) on CPU (36 dots); the rest of the Winograd ones to F(2x2, 3x3)
  (16 dots). Both match a float64 loop."""
  assert _cpu_matmul_dots(shape, 3, 1, 2e-5) == dots


@pytest.mark.parametrize("shape,form", [((1, 128, 128, 128), "winograd"),
                                        ((4, 64, 64, 128), "winograd"),
                                        ((1, 64, 64, 128), "winograd"),
                                        ((1, 32, 32, 128), "taps"),
                                        ((1, 130, 126, 128), "taps")])
def test_large_4x4_stride2_convs_take_winograd_on_cpu(shape, form):
  """4x4 stride-2 convs with even output sides over >= 256 output tiles lower to
  F(2x2, 2x2) on CPU (9 dots), smaller or odd ones to the folded taps (4 dots);
  accelerators keep `lax.conv`. Both match a float64 loop."""
  assert _cpu_matmul_dots(shape, 4, 2, 1e-5) == {"winograd": 9, "taps": 4}[form]


@pytest.mark.parametrize("form,kernel,stride", [("winograd", 3, 1), ("winograd4", 3, 1),
                                                ("taps", 4, 2), ("winograd_stride2", 4, 2)])
def test_matmul_forms_have_lax_conv_gradients(form, kernel, stride):
  """Training through the CPU matmul forms: their gradients (input and kernel) are
  `lax.conv`'s."""
  x = jnp.asarray(RNG.standard_normal((2, 8, 12, 4)), jnp.float32)
  w = jnp.asarray(RNG.standard_normal((kernel, kernel, 4, 3)), jnp.float32)
  cotangent = jnp.asarray(RNG.standard_normal((2, 8 // stride, 12 // stride, 3)), jnp.float32)
  fast = {"winograd": ops.conv3x3_winograd,
          "winograd4": lambda x, w: ops.conv3x3_winograd(x, w, transform=ops.WINOGRAD_F4_3),
          "taps": lambda x, w: ops.conv2d_stride2_taps(x, w, ((1, 1), (1, 1))),
          "winograd_stride2": lambda x, w: ops.conv4x4_stride2_winograd(x, w, ((1, 1), (1, 1)))
          }[form]

  def by_lax(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  got = jax.vjp(fast, x, w)[1](cotangent)
  want = jax.vjp(by_lax, x, w)[1](cotangent)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.abs(r).max())


def test_concat_conv1x1_is_a_conv_of_the_concatenation():
  """`plain.ConcatConv1x1` has `plain.Conv`'s parameters (same init) and output on the
  concatenated parts, against a float64 matmul."""
  from g2face_jax.nn import plain
  parts = [RNG.standard_normal((2, 5, 7, c)).astype(np.float32) for c in (3, 8, 4)]
  joined = np.concatenate(parts, axis=-1)
  split = plain.ConcatConv1x1(6)
  conv = plain.Conv(15, 6, 1)
  variables = split.init(jax.random.key(0), parts)
  same = jax.tree.map(np.array_equal, variables, conv.init(jax.random.key(0), joined))
  assert all(jax.tree.leaves(same))
  params = variables["params"]
  ref = joined.astype(np.float64) @ np.asarray(params["kernel"][0, 0], np.float64) + params["bias"]
  np.testing.assert_allclose(split.apply(variables, parts), ref, rtol=0, atol=1e-5)
  np.testing.assert_allclose(conv.apply(variables, joined), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_kernel_energy_is_the_sum_over_taps(k):
  w = RNG.standard_normal((k, k, 6, 5)).astype(np.float32)
  np.testing.assert_allclose(ops.kernel_energy(w), np.square(w.astype(np.float64)).sum(axis=(0, 1)),
                             rtol=1e-6)


@pytest.mark.parametrize("shape,padding", [((2, 6, 8, 5), ((1, 1), (1, 1))),
                                           ((1, 7, 9, 5), ((1, 0), (0, 2))),
                                           ((1, 6, 6, 5), ((0, 0), (0, 0)))])
def test_conv2x2_winograd_matches_numpy(shape, padding):
  """F(2x2, 2x2) on a 2x2 stride-1 kernel, odd output sides (cropped) included."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = RNG.standard_normal((2, 2, shape[3], 7)).astype(np.float32)
  ref = conv_numpy(np.pad(x, ((0, 0),) + padding + ((0, 0),)), w, 1, 0)
  got = ops.conv2x2_winograd(x, w, padding)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("shape,kernel,stride,dots", [
    ((1, 8, 8, 128), 3, 1, 16), ((1, 32, 32, 256), 3, 1, 36), ((1, 4, 4, 128), 3, 1, 0),
    ((1, 32, 32, 128), 4, 2, 9), ((1, 8, 8, 128), 4, 2, 0), ((1, 16, 16, 128), 2, 1, 9),
    ((1, 8, 8, 128), 2, 1, 0)])
def test_hoisted_cpu_forms_take_winograd_on_smaller_grids(shape, kernel, stride, dots):
  """Within `hoisted_cpu_forms` (kernel transforms done once) the Winograd forms start
  at smaller grids than in a jitted program, 2x2 kernels included (0 dots: `lax.conv`),
  with no platform branch; all match a float64 loop."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = (RNG.standard_normal((kernel, kernel, shape[3], 2))
       / np.sqrt(kernel * kernel * shape[3])).astype(np.float32)
  with ops.hoisted_cpu_forms():
    program = jax.make_jaxpr(lambda x, w: ops.conv2d(x, w, stride, 1))(x, w).pretty_print()
    got = jax.jit(lambda x, w: ops.conv2d(x, w, stride, 1))(x, w)
  assert "cond" not in program
  assert program.count("dot_general") == dots
  assert ("conv_general_dilated" in program) == (dots == 0)
  ref = conv_numpy(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), w, stride, 0)
  np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
