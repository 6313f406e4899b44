"""The official float32 <-> 32-bit codec of the password."""
import os

import numpy as np

from conftest import FIXTURES, rel_err
from g2face_jax import payload


def test_codec_matches_official_fixture():
  fx = np.load(os.path.join(FIXTURES, "bit_codec.npz"))
  np.testing.assert_array_equal(payload.float_to_bits(fx["floats"]), fx["bits"])
  assert rel_err(payload.bits_to_float(fx["bits"]), fx["back"]) <= 1e-4
  np.testing.assert_array_equal(payload.bits_to_float(fx["bits"]), fx["back"])


def test_bits_are_the_ieee_pattern_sign_first():
  rng = np.random.default_rng(0)
  values = rng.standard_normal((3, 512)).astype(np.float32) * 10
  bits = np.asarray(payload.float_to_bits(values)).astype(np.uint32)
  pattern = values.view(np.uint32)
  expected = (pattern[..., None] >> np.arange(31, -1, -1, dtype=np.uint32)) & 1
  np.testing.assert_array_equal(bits, expected)
  np.testing.assert_array_equal(payload.bits_to_float(bits), values)


def test_exact_zero_is_written_as_1e_minus_8():
  bits = np.asarray(payload.float_to_bits(np.zeros((1, 2), np.float32)))
  word = int("".join(str(int(b)) for b in bits[0, 0]), 2)
  assert word == 0x322BCC77
  assert word == int(np.float32(1e-8).view(np.uint32))


def test_every_exponent_decodes_by_the_formula_and_clamps():
  rng = np.random.default_rng(1)
  bits = rng.integers(0, 2, (256, 32)).astype(np.float32)
  exps = np.arange(256)
  bits[:, 1:9] = (exps[:, None] >> np.arange(7, -1, -1)) & 1
  values = np.asarray(payload.bits_to_float(bits))
  s = bits[:, 0]
  mant = 1 + (bits[:, 9:] * 2.0 ** -np.arange(1, 24)).sum(axis=1)
  with np.errstate(over="ignore"):
    formula = (-1.0) ** s * np.ldexp(mant, exps - 127)  # float64: e=255 is finite here
  normal = (exps > 0) & (exps < 255)
  np.testing.assert_array_equal(values[normal], formula[normal].astype(np.float32))
  assert np.isinf(values[255]) and np.sign(values[255]) == (-1.0) ** s[255]
  assert abs(values[0]) <= 2.0 ** -126  # 2^-127 (1 + m), possibly flushed to zero
  decoded = np.asarray(payload.decode_identity(bits))
  assert np.all(np.isfinite(decoded)) and np.all(np.abs(decoded) <= 50)
  np.testing.assert_array_equal(decoded[np.abs(values) <= 50], values[np.abs(values) <= 50])
  assert decoded[255] == 0


def test_bits_from_logits_rounds_half_to_zero():
  logits = np.array([-3.0, -1e-9, 0.0, 1e-9, 2.0], np.float32)
  np.testing.assert_array_equal(payload.bits_from_logits(logits), [0, 0, 0, 0, 1])
