"""The convolution lowering forms (`nn.lowering`): each matmul / Winograd form
against a float64 loop, which shapes take which form on CPU, and that other
platforms keep XLA's convolution."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax.nn import lowering

RNG = np.random.default_rng(1)


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
  Both entry points (`Lowering.conv2d`, `plain.Conv` through `Lowering.conv_general_dilated`)
  agree with a float64 loop, odd sizes included."""
  from g2face_jax.nn import plain
  x = RNG.standard_normal((2, 7, 9, 5)).astype(np.float32)
  w = RNG.standard_normal((k, k, 5, 4)).astype(np.float32)
  ref = conv_numpy(x, w, stride, pad)
  np.testing.assert_allclose(lowering.DEFAULT.conv2d(x, w, stride, pad), ref, rtol=0, atol=1e-5)
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
  np.testing.assert_allclose(lowering.DEFAULT.conv2d(x, w, 2, pad), ref, rtol=0, atol=atol)
  conv = plain.Conv(cin, 6, 4, stride=2, padding=pad, use_bias=False)
  got = conv.apply({"params": {"kernel": jnp.asarray(w)}}, x)
  np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
  lowered = jax.jit(lambda v: conv.apply(v, x)).trace(
      {"params": {"kernel": jnp.asarray(w)}}).lower(lowering_platforms=("cpu",))
  assert ("convolution" in lowered.as_text()) == (cin < 128)
  np.testing.assert_allclose(lowering.conv2d_stride2_taps(x, w, ((pad, pad + 1), (0, pad))),
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
  got = lowering.conv4x4_stride2_winograd(x, w, padding)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  with pytest.raises(ValueError, match="even output"):
    lowering.conv4x4_stride2_winograd(x[:, :6], w, ((1, 1), (1, 1)))


@pytest.mark.parametrize("transform,shape,atol", [("WINOGRAD_F2_3", (2, 6, 8, 5), 1e-5),
                                                 ("WINOGRAD_F4_3", (2, 8, 12, 5), 2e-5)])
def test_conv3x3_winograd_matches_numpy(transform, shape, atol):
  """F(2x2, 3x3) and F(4x4, 3x3) against a float64 loop, to float32 rounding."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = RNG.standard_normal((3, 3, shape[3], 7)).astype(np.float32)
  ref = conv_numpy(x, w, 1, 1)
  got = lowering.conv3x3_winograd(x, w, transform=getattr(lowering, transform))
  np.testing.assert_allclose(got, ref, rtol=0, atol=atol * np.abs(ref).max())


@pytest.mark.parametrize("transform", ["WINOGRAD_F2_3", "WINOGRAD_F2_2", "WINOGRAD_F4_3"])
def test_winograd_transforms_compute_the_correlation(transform):
  """A^T [(G g) * (B^T d)] is the valid correlation of d by g for every (d, g),
  checked in float64 on the basis vectors: the transform triples are exact."""
  bt, g, at = (np.asarray(m, np.float64) for m in getattr(lowering, transform))
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
  np.testing.assert_allclose(lowering.DEFAULT.conv2d(x, w, 1, 1), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  cpu, accelerators = _cpu_and_accelerator_lowerings(lambda x, w: lowering.DEFAULT.conv2d(x, w, 1, 1), x, w)
  assert ("convolution" in cpu) == (not matmuls)
  assert all("convolution" in text for text in accelerators)


def _cpu_matmul_dots(shape, kernel: int, stride: int, atol: float) -> int:
  """Checks `Lowering.conv2d` (padding 1, 2 output channels) on a random input of `shape`
  against a float64 loop, and that it lowers to matmuls on CPU and to `lax.conv` on
  accelerators; returns the number of dots in the CPU lowering."""
  x = RNG.standard_normal(shape).astype(np.float32)
  w = (RNG.standard_normal((kernel, kernel, shape[3], 2))
       / np.sqrt(kernel * kernel * shape[3])).astype(np.float32)
  ref = conv_numpy(x, w, stride, 1)
  np.testing.assert_allclose(lowering.DEFAULT.conv2d(x, w, stride, 1), ref, rtol=0,
                             atol=atol * np.abs(ref).max())
  cpu, accelerators = _cpu_and_accelerator_lowerings(
      lambda x, w: lowering.DEFAULT.conv2d(x, w, stride, 1), x, w)
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
  fast = {"winograd": lowering.conv3x3_winograd,
          "winograd4": lambda x, w: lowering.conv3x3_winograd(x, w, transform=lowering.WINOGRAD_F4_3),
          "taps": lambda x, w: lowering.conv2d_stride2_taps(x, w, ((1, 1), (1, 1))),
          "winograd_stride2": lambda x, w: lowering.conv4x4_stride2_winograd(x, w, ((1, 1), (1, 1)))
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

def test_policy_without_cpu_rules_keeps_xla_convolutions():
  """`Lowering(cpu_rules=None)` lowers a shape the default rules turn into Winograd
  matmuls to XLA's convolution on CPU, with the same result."""
  x = RNG.standard_normal((1, 16, 16, 128)).astype(np.float32)
  w = (RNG.standard_normal((3, 3, 128, 3)) / np.sqrt(9 * 128)).astype(np.float32)
  plain_xla = lowering.Lowering(cpu_rules=None)
  cpu_default = jax.jit(lambda x, w: lowering.DEFAULT.conv2d(x, w, 1, 1)).trace(x, w).lower(
      lowering_platforms=("cpu",)).as_text()
  cpu_plain = jax.jit(lambda x, w: plain_xla.conv2d(x, w, 1, 1)).trace(x, w).lower(
      lowering_platforms=("cpu",)).as_text()
  assert "convolution" not in cpu_default and "convolution" in cpu_plain
  ref = conv_numpy(x, w, 1, 1)
  np.testing.assert_allclose(plain_xla.conv2d(x, w, 1, 1), ref, rtol=0,
                             atol=1e-5 * np.abs(ref).max())


def test_rules_table_decides_the_form():
  """Raising a threshold of `CpuRules` moves a shape back to XLA's convolution."""
  x = RNG.standard_normal((1, 16, 16, 128)).astype(np.float32)
  w = RNG.standard_normal((3, 3, 128, 3)).astype(np.float32)
  strict = lowering.Lowering(cpu_rules=lowering.CpuRules(winograd3_min_tiles=10_000))
  text = jax.jit(lambda x, w: strict.conv2d(x, w, 1, 1)).trace(x, w).lower(
      lowering_platforms=("cpu",)).as_text()
  assert "convolution" in text


def test_for_dtype_names_the_operands():
  assert lowering.for_dtype(None) == lowering.DEFAULT == lowering.for_dtype("float32")
  assert lowering.for_dtype("bfloat16").operand_dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="float16"):
    lowering.for_dtype("float16")
