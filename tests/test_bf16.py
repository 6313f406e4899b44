"""The optional bfloat16 inference path: convolutions as bfloat16 matmuls with float32
accumulation, against lax.conv and NumPy; the tiny pipeline close to float32; the float32
default untouched; bad dtypes refused by name.

Bound used below: bfloat16 keeps 8 significant bits, so rounding an operand changes it
by at most 2^-9 relative. A dot of two rounded operands is off by about 2^-9 relative
(RMS, the two roundings combined), so one layer stays within 2^-8 (0.4 %); the tiny
pipeline, a few such layers deep with normalisations in between, within 1 %. The CPU's
Winograd forms round transformed operands, and their read-back sums products larger
than the outputs it forms (F(2x2, 3x3): 9 per output), which raised the RMS error 1.7x
(F(2x2, 3x3)) and 2x (F(2x2, 2x2)) on random data: 2^-7 for one such layer.
"""
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax import cli, models, pipeline
from g2face_jax.nn import decoder, lowering, plain, stylegan

from conftest import random_variables

BF16 = lowering.for_dtype("bfloat16")

RNG = np.random.default_rng(0)
LAYER_BOUND = 2.0 ** -8
WINOGRAD_LAYER_BOUND = 2.0 ** -7
PIPELINE_BOUND = 1e-2


def conv_numpy(x, w, stride, pad):
  """Cross-correlation in float64; x (B,H,W,C), w (kh,kw,C,O), pad ((t,b),(l,r))."""
  (pt, pb), (pl, pr) = pad
  xp = np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  kh, kw = w.shape[:2]
  oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[3]))
  for i, j in itertools.product(range(kh), range(kw)):
    patch = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
    out += patch @ w[i, j].astype(np.float64)
  return out


def rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def bf16_round(a):
  return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


CASES = [  # (H, W, k, stride, padding): every form the networks use, odd sizes too
    (8, 8, 3, 1, ((1, 1), (1, 1))), (7, 9, 3, 1, ((0, 2), (1, 1))), (8, 8, 4, 2, ((1, 1), (1, 1))),
    (9, 7, 3, 2, ((1, 1), (1, 1))), (6, 6, 1, 1, ((0, 0), (0, 0))), (7, 5, 2, 1, ((1, 1), (1, 1))),
    (5, 6, 2, 1, ((1, 1), (0, 0))), (8, 8, 3, 2, ((0, 0), (0, 0))), (6, 6, 1, 2, ((0, 0), (0, 0))),
    (6, 7, (1, 2), 1, ((0, 0), (1, 1))), (5, 6, (1, 3), 1, ((0, 1), (2, 0))),
    (6, 5, (2, 1), 1, ((1, 1), (0, 0)))]  # the sub-pixel phases of transposed convs


def kernel_shape(k, cin, cout):
  return (k, k, cin, cout) if isinstance(k, int) else (*k, cin, cout)


@pytest.mark.parametrize("matmul_conv", [lowering.conv2d_matmul, lowering.conv2d_tap_matmul])
@pytest.mark.parametrize("h,w,k,stride,pad", CASES)
def test_matmul_conv_in_float32_equals_lax_conv(h, w, k, stride, pad, matmul_conv):
  x = RNG.standard_normal((2, h, w, 5)).astype(np.float32)
  kernel = RNG.standard_normal(kernel_shape(k, 5, 6)).astype(np.float32)
  ref = conv_numpy(x, kernel, stride, pad)
  got = matmul_conv(x, kernel, stride, pad, jnp.float32)
  assert got.dtype == jnp.float32 and got.shape == ref.shape
  np.testing.assert_allclose(got, lowering.DEFAULT.conv2d(x, kernel, stride, pad), rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("matmul_conv", [lowering.conv2d_matmul, lowering.conv2d_tap_matmul])
@pytest.mark.parametrize("h,w,k,stride,pad", CASES[:4] + CASES[-3:])
def test_bfloat16_matmul_conv_accumulates_in_float32(h, w, k, stride, pad, matmul_conv):
  # 300 input channels: a bfloat16 accumulator would be off by ~1e-2, float32 by ~1e-7
  x = RNG.standard_normal((1, h, w, 300)).astype(np.float32)
  kernel = RNG.standard_normal(kernel_shape(k, 300, 4)).astype(np.float32)
  got = matmul_conv(x, kernel, stride, pad, jnp.bfloat16)
  assert got.dtype == jnp.float32
  assert rel(got, conv_numpy(bf16_round(x), bf16_round(kernel), stride, pad)) < 1e-5
  assert rel(got, conv_numpy(x, kernel, stride, pad)) < LAYER_BOUND


def winograd_numpy(xp, w, transform, oh, ow, round_operands):
  """Winograd F(m x m, r x r) of a padded input in float64, the transformed tiles and
  kernel passed through `round_operands`; xp (B,H,W,C), w (r,r,C,O) -> (B,oh,ow,O)."""
  bt, g, at = (np.asarray(t, np.float64) for t in transform)
  n, m = len(bt), len(at)
  rows = np.arange(oh // m)[:, None, None, None] * m + np.arange(n)[None, None, :, None]
  cols = np.arange(ow // m)[None, :, None, None] * m + np.arange(n)[None, None, None, :]
  tiles = np.einsum("kn,btwnlc,ql->btwkqc", bt, xp.astype(np.float64)[:, rows, cols], bt)
  kernel = np.einsum("kr,rsco,qs->kqco", g, w.astype(np.float64), g)
  products = np.einsum("btwkqc,kqco->btwkqo", round_operands(tiles), round_operands(kernel))
  out = np.einsum("pk,btwkqo,sq->btpwso", at, products, at)
  return out.reshape(xp.shape[0], oh, ow, w.shape[3])


@pytest.mark.parametrize("shape,k,stride,cpu_form", [
    ((1, 32, 32, 256), 3, 1, "F(2x2, 3x3)"), ((1, 64, 64, 128), 4, 2, "F(2x2, 2x2)"),
    ((1, 32, 32, 128), 4, 2, "taps"), ((1, 63, 63, 64), 2, 1, "taps on N"),
    ((1, 64, 64, 64), 3, 1, "direct"), ((1, 31, 31, 256), 2, 1, "direct")])
def test_bfloat16_convs_take_the_cpu_matmul_forms(shape, k, stride, cpu_form):
  """On CPU a bfloat16 `conv2d` runs the float32 path's matmul forms (never F(4x4, 3x3))
  with float32 transforms, bfloat16-rounded operands and float32 accumulation; other
  kernels of up to 4 taps over >= 64x64 outputs `conv2d_tap_matmul`, the rest and
  accelerators the one-matmul `conv2d_matmul` (which stacks shifted inputs)."""
  x = RNG.standard_normal(shape).astype(np.float32)
  kernel = (RNG.standard_normal((k, k, shape[3], 8)) / np.sqrt(k * k * shape[3])).astype(np.float32)
  pad = ((1, 1), (1, 1))
  exact = conv_numpy(x, kernel, stride, pad)
  got = BF16.conv2d(x, kernel, stride, pad)
  assert got.dtype == jnp.float32
  if cpu_form.startswith("F"):
    if stride == 1:
      xp, w, transform = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel, lowering.WINOGRAD_F2_3
    else:
      xp, w = lowering._fold_stride2(x, kernel, pad, *exact.shape[1:3])
      transform = lowering.WINOGRAD_F2_2
    want = winograd_numpy(np.asarray(xp), np.asarray(w), transform, *exact.shape[1:3], bf16_round)
    assert rel(got, want) < 1e-4  # float32 accumulation; bfloat16 sums would be off by ~1e-2
    assert rel(got, exact) < WINOGRAD_LAYER_BOUND
  else:
    assert rel(got, conv_numpy(bf16_round(x), bf16_round(kernel), stride, pad)) < 1e-5
  traced = jax.jit(lambda x, w: BF16.conv2d(x, w, stride, pad)).trace(x, kernel)
  cpu, *accelerators = (traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda"))
  dots = {"F(2x2, 3x3)": 16, "F(2x2, 2x2)": 9, "taps": 4, "taps on N": 1, "direct": 1}[cpu_form]
  if dots == 1:  # conv2d_matmul stacks the kernel's column shifts of the input
    assert ("concatenate" in cpu) == (cpu_form == "direct")
  bf16_dots = re.findall(r"dot_general .*xbf16>, tensor<\S*xbf16>\) -> tensor<\S*xf32>", cpu)
  assert cpu.count("stablehlo.dot_general") == len(bf16_dots) == dots
  assert all(text.count("stablehlo.dot_general") == 1 for text in accelerators)


def test_conv_general_dilated_bf16_in_flax_conv():
  x = RNG.standard_normal((2, 8, 8, 16)).astype(np.float32)
  fast = plain.Conv(16, 8, 4, stride=2, padding=1, dtype="bfloat16")
  ref = plain.Conv(16, 8, 4, stride=2, padding=1)
  variables = ref.init(jax.random.key(0), x)
  variables = jax.tree.map(lambda a: a + 0.1, variables)  # a non-zero bias
  assert jax.tree.structure(fast.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  out = fast.apply(variables, x)
  rounded = {"params": dict(variables["params"], kernel=bf16_round(variables["params"]["kernel"]))}
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref.apply(rounded, bf16_round(x)), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="no dilation or groups"):
    BF16.conv_general_dilated(x, np.ones((3, 3, 8, 8), np.float32), (1, 1), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)


def test_concat_conv1x1_bfloat16_is_the_bfloat16_conv_of_the_concatenation():
  parts = [RNG.standard_normal((2, 6, 5, c)).astype(np.float32) for c in (16, 300)]
  joined = np.concatenate(parts, axis=-1)
  variables = jax.tree.map(lambda a: a + 0.1,
                           plain.ConcatConv1x1(8).init(jax.random.key(0), parts))
  out = plain.ConcatConv1x1(8, dtype="bfloat16").apply(variables, parts)
  assert out.dtype == jnp.float32
  ref = plain.Conv(316, 8, 1, dtype="bfloat16").apply(variables, joined)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
  assert rel(out, plain.Conv(316, 8, 1).apply(variables, joined)) < LAYER_BOUND


@pytest.mark.parametrize("up,k", [(False, 3), (True, 3), (False, 1)])
def test_modulated_conv_bfloat16_close_to_float32(up, k):
  x = RNG.standard_normal((2, 8, 8, 64)).astype(np.float32)
  style = RNG.standard_normal((2, 16)).astype(np.float32)
  ref = stylegan.ModulatedConv(32, k, upsample=up)
  variables = ref.init(jax.random.key(1), x, style)
  want = ref.apply(variables, x, style)
  got = stylegan.ModulatedConv(32, k, upsample=up, dtype="bfloat16").apply(variables, x, style)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  assert rel(got, want) < LAYER_BOUND


@pytest.fixture(scope="module")
def tiny_run(tiny_config):
  model = tiny_config.model
  nets = models.Networks.from_config(model)
  variables = random_variables(model, models.INFERENCE_NETWORKS)
  k = jax.random.split(jax.random.key(3), 3)
  x = jax.random.uniform(k[0], (2, model.size, model.size, 3), jnp.float32, -1.0, 1.0)
  z = jax.random.normal(k[1], (2, model.identity_dim))
  shapes = decoder.noise_shapes(model.size, 2)
  noise = [jax.random.normal(key, s) for key, s in zip(jax.random.split(k[2], len(shapes)), shapes)]
  out = pipeline.official_anonymize(nets, variables, x, z, noise)
  return nets, variables, x, z, noise, out


def test_bfloat16_pipeline_close_to_float32(tiny_run):
  nets, variables, x, z, noise, ref = tiny_run
  anon = pipeline.anonymize(nets, variables, x, ref["coeff"], z, ref["hide_bits"], noise,
                            dtype="bfloat16")["anon"]
  assert anon.dtype == jnp.float32 and rel(anon, ref["anon"]) < PIPELINE_BOUND
  # each stage from the same float32 inputs, so errors do not compound through bit flips
  identity = ref["arc_id"]
  want = pipeline.restore(nets, variables, ref["anon"], identity, ref["hide_bits"], noise)
  got = pipeline.restore(nets, variables, ref["anon"], identity, ref["hide_bits"], noise,
                         dtype="bfloat16")
  assert got["recovered"].dtype == jnp.float32
  assert rel(got["recovered"], want["recovered"]) < PIPELINE_BOUND
  logits = pipeline.extract_identity(nets, variables, ref["anon"])["logits"]
  logits16 = pipeline.extract_identity(nets, variables, ref["anon"], dtype="bfloat16")["logits"]
  assert logits16.dtype == jnp.float32 and rel(logits16, logits) < PIPELINE_BOUND


def test_float32_default_is_the_official_program(tiny_run):
  nets, variables, x, z, noise, ref = tiny_run
  explicit = pipeline.anonymize(nets, variables, x, ref["coeff"], z, ref["hide_bits"], noise,
                                dtype="float32")
  np.testing.assert_array_equal(explicit["anon"], ref["anon"])
  assert pipeline.in_dtype(nets, "float32") is nets
  args = (variables, x, ref["coeff"], z, ref["hide_bits"], noise)
  default_hlo = pipeline.anonymize.trace(nets, *args).lower().as_text()
  assert "bf16" not in default_hlo and "bf16" in pipeline.anonymize.trace(
      nets, *args, dtype="bfloat16").lower().as_text()


def test_bad_dtype_is_refused_by_name(tiny_run, capsys):
  nets, variables, x, z, noise, ref = tiny_run
  with pytest.raises(ValueError, match="unknown compute dtype 'float16'.*float32, bfloat16"):
    pipeline.anonymize(nets, variables, x, ref["coeff"], z, ref["hide_bits"], noise,
                       dtype="float16")
  with pytest.raises(ValueError, match="unknown compute dtype 'int8'"):
    decoder.Decoder(32, (32, 32, 16, 16), dtype="int8").init(
        jax.random.key(0), x, jnp.zeros((2, 8, 32)), ref["hide_bits"], noise)
  assert cli.main(["bench", "--config", "tiny", "--dtype", "float16"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("g2face bench: error:") and "--dtype 'float16'" in err and "\n" not in err
