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


@pytest.mark.parametrize("k", [1, 3, 4])
def test_kernel_energy_is_the_sum_over_taps(k):
  w = RNG.standard_normal((k, k, 6, 5)).astype(np.float32)
  np.testing.assert_allclose(ops.kernel_energy(w), np.square(w.astype(np.float64)).sum(axis=(0, 1)),
                             rtol=1e-6)
