"""The anonymize / recover pipeline against the official pipeline fixture, and its
composition on the tiny config."""
import re

import jax
import numpy as np
import pytest

from g2face_jax import payload, pipeline
from g2face_jax.tools import parity
from g2face_jax.nn import decoder

from conftest import FIXTURES


def test_every_stage_matches_the_official_pipeline():
  nets, variables = parity.official_variables(FIXTURES)
  errs = parity.compare_pipeline(nets, variables, FIXTURES)
  bad = {k: v for k, v in errs.items() if not v <= parity.TOLERANCE}
  assert not bad, f"stages over {parity.TOLERANCE}: {bad}"
  assert errs["bits (share wrong)"] == 0 and errs["bits (end to end, share wrong)"] == 0


def test_official_chain_hides_the_ieee_bits_of_the_identity(tiny):
  nets, variables, x, z, noise = tiny
  out = pipeline.official_anonymize(nets, variables, x, z, noise)
  assert out["anon"].shape == x.shape
  np.testing.assert_array_equal(out["hide_bits"], payload.float_to_bits(out["arc_id"]))
  # the hidden value of bit pattern k is exactly the ArcFace value (IEEE layout)
  np.testing.assert_array_equal(payload.bits_to_float(out["hide_bits"]),
                                np.where(out["arc_id"] == 0, np.float32(1e-8), out["arc_id"]))
  back = pipeline.official_recover(nets, variables, out["anon"], out["hide_bits"], noise)
  assert back["recovered"].shape == x.shape and np.all(np.isfinite(back["recovered"]))
  assert back["logits"].shape == (2,) + decoder.BITS_SHAPE


def test_stages_are_deterministic_and_per_sample(tiny):
  """Same inputs -> same output; a sample's output does not depend on its batch-mates."""
  nets, variables, x, z, noise = tiny
  coeff = pipeline.analyze(nets, variables, x)["coeff"]
  bits = payload.float_to_bits(z)
  full = pipeline.anonymize(nets, variables, x, coeff, z, bits, noise)["anon"]
  again = pipeline.anonymize(nets, variables, x, coeff, z, bits, noise)["anon"]
  np.testing.assert_array_equal(full, again)
  first = pipeline.anonymize(nets, variables, x[:1], coeff[:1], z[:1], bits[:1],
                             [n[:1] for n in noise])["anon"]
  np.testing.assert_allclose(first, full[:1], rtol=1e-5, atol=1e-5)


def test_micro_batch_loop_gives_the_whole_batch_result(tiny):
  """The per-sample loop (`micro_batch`) changes the schedule, not the results; the
  CPU default is one sample per step. (Bits are fixed: float_to_bits of an ArcFace
  value one ulp apart would hide different bits.)"""
  nets, variables, x, z, noise = tiny
  x4, z4 = np.concatenate([x, x[::-1]]), np.concatenate([z, z[::-1]])
  noise4 = [np.concatenate([n, n[::-1]]) for n in noise]
  bits = payload.float_to_bits(z4)

  def stages(micro):
    out = dict(pipeline.analyze(nets, variables, x4, micro_batch=micro))
    out.update(pipeline.anonymize(nets, variables, x4, out["coeff"], z4, bits, noise4,
                                  micro_batch=micro))
    out.update(pipeline.extract_identity(nets, variables, out["anon"], micro_batch=micro))
    out.update(pipeline.restore(nets, variables, out["anon"], z4, bits, noise4,
                                micro_batch=micro))
    return out

  whole = stages(4)
  assert pipeline.default_micro_batch() == (1 if jax.default_backend() == "cpu" else None)
  for micro in (None, 2):  # None on CPU: 1 face per step, 4 for ArcFace and the 3DMM net
    out = stages(micro)
    for key in ("arc_id", "coeff", "style", "anon", "logits", "coeff_anon", "recovered"):
      np.testing.assert_allclose(out[key], whole[key], rtol=1e-5, atol=1e-5, err_msg=key)
  chain = pipeline.official_anonymize(nets, variables, x4, z4, noise4, micro_batch=2)
  np.testing.assert_allclose(chain["arc_id"], whole["arc_id"], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not a multiple of micro_batch 3"):
    pipeline.analyze(nets, variables, x4, micro_batch=3)
  with pytest.raises(ValueError, match="micro_batch must be >= 1"):
    pipeline.analyze(nets, variables, x4, micro_batch=0)


def test_default_faces_per_step_divide_the_batch():
  """Without a micro_batch, CPU steps take the largest divisor of the batch up to
  `cpu_faces` (accelerators: the whole batch); a given one is checked, not adjusted."""
  cpu = jax.default_backend() == "cpu"
  for batch, cpu_faces, expected in [(4, 4, 4), (8, 4, 4), (6, 4, 3), (5, 4, 1), (2, 4, 2),
                                     (4, 1, 1)]:
    assert pipeline.faces_per_step(None, batch, cpu_faces) == (expected if cpu else batch)
  assert pipeline.faces_per_step(8, 4, 1) == 4
  with pytest.raises(ValueError, match="batch 6 is not a multiple of micro_batch 4"):
    pipeline.faces_per_step(4, 6, 4)


def _precisions(lowered_text: str) -> list[str]:
  """The precision of every dot_general and convolution of a StableHLO module ('' when unset)."""
  ops = re.findall(r"stablehlo\.(?:dot_general|convolution)[^\n]*", lowered_text)
  return [(re.search(r"precision(?:_config)? = \[(?:#stablehlo<precision )?(\w+)", op) or
           re.search("()", "")).group(1) for op in ops]


def test_official_paths_compute_in_full_float32_unless_the_caller_sets_a_precision(tiny):
  """JAX's default precision lets GPUs round float32 operands to TF32 (and TPUs to
  bfloat16); the pipeline asks for 'highest' on every matmul and convolution, and a
  caller's own `jax.default_matmul_precision` wins."""
  nets, variables, x, z, noise = tiny
  with jax.default_matmul_precision(None):  # conftest sets 'highest' for the whole run
    own = _precisions(pipeline.official_anonymize.trace(nets, variables, x, z, noise)
                      .lower(lowering_platforms=("cuda",)).as_text())
    with jax.default_matmul_precision("tensorfloat32"):
      bits = payload.float_to_bits(z)
      tf32 = _precisions(pipeline.official_recover.trace(nets, variables, x, bits, noise)
                         .lower(lowering_platforms=("cuda",)).as_text())
  assert len(own) > 10 and set(own) == {"HIGHEST"}, sorted(set(own))
  assert len(tf32) > 10 and "HIGHEST" not in tf32, sorted(set(tf32))
