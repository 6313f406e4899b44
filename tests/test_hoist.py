"""Stages with their weight-only work hoisted (`hoist`): same results as the jitted
stages, the kernels' transforms out of the per-call program, weights not copied."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax import hoist, payload, pipeline
from g2face_jax.nn import ops

RNG = np.random.default_rng(0)


@functools.partial(jax.jit, static_argnums=0)
def _conv_stage(nets, variables, x):
  """A stage of one 3x3 convolution (F(2x2, 3x3) on CPU at these sizes) and one matmul."""
  del nets
  conv = ops.conv2d(x, variables["kernel"], padding=1)
  return dict(conv=conv, dense=x.mean(axis=(1, 2)) @ variables["dense"])


def _conv_inputs():
  variables = dict(kernel=jnp.asarray(RNG.standard_normal((3, 3, 128, 8)) / 30, jnp.float32),
                   dense=jnp.asarray(RNG.standard_normal((128, 4)), jnp.float32))
  x = RNG.standard_normal((1, 16, 16, 128)).astype(np.float32)
  return variables, x


@pytest.mark.skipif(not hoist.hoists(), reason="hoisting is for one CPU device")
def test_per_call_program_takes_the_transformed_kernel_and_the_raw_dense_weight():
  variables, x = _conv_inputs()
  bound = hoist.bind(_conv_stage, None, variables)
  out = bound(x)
  exact = jax.lax.conv_general_dilated(
      x.astype(np.float64), np.asarray(variables["kernel"], np.float64), (1, 1),
      ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(out["conv"], exact, rtol=0, atol=2e-5 * np.abs(exact).max())
  np.testing.assert_allclose(out["dense"], _conv_stage(None, variables, x)["dense"], rtol=1e-6)
  (split,) = bound.splits.values()
  shapes = sorted(tuple(r.shape) for r in split.residuals)
  # F(2x2, 3x3): 4x4 transformed kernel positions of (Cin, Cout), no raw 3x3 kernel
  assert shapes.count((128, 8)) == 16 and (3, 3, 128, 8) not in shapes, shapes
  assert any(r is variables["dense"] for r in split.residuals)  # passed on, not copied
  transformed = 16 * 128 * 8 * 4  # bytes; beyond them only scalars
  assert transformed <= hoist.residual_bytes(bound) < transformed + 64
  per_call = jax.make_jaxpr(split.run)(*split.residuals, x).pretty_print()
  assert "platform_index" not in per_call and "cond" not in per_call
  assert per_call.count("dot_general") == 17


@pytest.mark.skipif(not hoist.hoists(), reason="hoisting is for one CPU device")
def test_bound_stage_splits_once_per_input_signature():
  variables, x = _conv_inputs()
  bound = hoist.bind(_conv_stage, None, variables)
  bound(x)
  bound(x + 1)
  assert len(bound.splits) == 1
  two = bound(np.concatenate([x, -x]))
  assert len(bound.splits) == 2
  np.testing.assert_allclose(two["conv"][1], -bound(x)["conv"][0], rtol=1e-6, atol=1e-6)


def test_plain_jitted_stage_is_unchanged_after_a_hoisted_trace():
  """Tracing for the hoisted program resolves the CPU forms; the jitted stage still
  lowers with the platform choice in it (checked by lowering for CUDA)."""
  variables, x = _conv_inputs()
  if jax.default_backend() == "cpu":
    hoist.bind(_conv_stage, None, variables)(x)
  cuda = _conv_stage.trace(None, variables, x).lower(lowering_platforms=("cuda",)).as_text()
  assert "stablehlo.convolution" in cuda


def _assert_close(got: dict, want: dict, keys) -> None:
  for key in keys:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_hoisted_stages_give_the_jitted_stages_results(tiny):
  """Stage by stage from the same inputs (the hidden bits fixed: the IEEE bits of
  ArcFace values that differ in float32 rounding differ in their low bits)."""
  nets, variables, x, z, noise = tiny
  stages = hoist.Stages(nets, variables)
  _assert_close(stages.analyze(x), pipeline.analyze(nets, variables, x), ("arc_id", "coeff"))
  coeff = pipeline.analyze(nets, variables, x)["coeff"]
  bits = payload.float_to_bits(z)
  want = pipeline.anonymize(nets, variables, x, coeff, z, bits, noise)
  _assert_close(stages.anonymize(x, coeff, z, bits, noise), want, ("rand_id", "style", "anon"))
  _assert_close(stages.extract_identity(want["anon"]),
                pipeline.extract_identity(nets, variables, want["anon"]), ("logits",))
  _assert_close(stages.restore(want["anon"], z, bits, noise),
                pipeline.restore(nets, variables, want["anon"], z, bits, noise),
                ("coeff_anon", "recovered"))


def test_hoisted_official_chains_hide_and_read_their_own_bits(tiny):
  nets, variables, x, z, noise = tiny
  stages = hoist.Stages(nets, variables)
  out = stages.official_anonymize(x, z, noise)
  assert set(out) == set(pipeline.official_anonymize.eval_shape(nets, variables, x, z, noise))
  np.testing.assert_array_equal(out["hide_bits"], payload.float_to_bits(out["arc_id"]))
  back = stages.official_recover(out["anon"], out["hide_bits"], noise)
  extracted = stages.extract_identity(out["anon"])
  np.testing.assert_array_equal(back["bits"], extracted["bits"])
  _assert_close(back, stages.restore(out["anon"], extracted["extracted_id"], out["hide_bits"],
                                     noise), ("recovered",))


def test_shared_arrays_keep_equal_arrays_once():
  shared = hoist.SharedArrays()
  a = jnp.arange(1000, dtype=jnp.float32)
  assert shared.keep(a) is a
  assert shared.keep(jnp.arange(1000, dtype=jnp.float32)) is a
  b = a.at[1].set(-1.0)  # the same sampled elements (every 15th), other values
  assert shared.keep(b) is b and shared.keep(jnp.array(b)) is b
  assert shared.keep(a.astype(jnp.int32)) is not a
  assert shared.keep(a.reshape(10, 100)) is not a


def test_stages_share_their_equal_residuals(tiny):
  """anonymize and restore run the same decoder: its residuals are kept once."""
  nets, variables, x, z, noise = tiny
  stages = hoist.Stages(nets, variables)
  coeff = stages.analyze(x)["coeff"]
  bits = payload.float_to_bits(z)
  anon = stages.anonymize(x, coeff, z, bits, noise)["anon"]
  stages.restore(anon, z, bits, noise)
  if not hoist.hoists():
    assert stages.residual_bytes() == 0
    return
  own = hoist.residual_bytes(stages.anonymize) + hoist.residual_bytes(stages.restore)
  both = hoist.residual_bytes(stages.anonymize, stages.restore)
  assert 0 < both < own
  assert {id(r) for r in stages.anonymize.residuals().values()} & {
      id(r) for r in stages.restore.residuals().values()}
