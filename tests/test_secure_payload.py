"""The keyed codec of the hidden bits: round trip, bit errors, wrong keys, tampering, balance."""
import hashlib

import numpy as np
import pytest
import reedsolo
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from g2face_jax import payload
from g2face_jax.privacy import keys
from g2face_jax.privacy import secure_payload as sp

KEY = keys.Key(bytes(range(32)))


def _identity(seed):
  return np.random.default_rng(seed).standard_normal(512).astype(np.float32) * 1.7


def _cos(a, b):
  return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def _flip(bits, rate, rng):
  return np.where(rng.random(bits.shape) < rate, 1 - bits, bits).astype(np.float32)


@pytest.mark.parametrize("layout", sp.LAYOUTS)
def test_round_trip_and_determinism(layout):
  identity = _identity(0)
  bits = sp.encode(KEY, identity, b"image/0", layout)
  assert bits.shape == (512, 32) and set(np.unique(bits)) <= {0.0, 1.0}
  np.testing.assert_array_equal(bits, sp.encode(KEY, identity, b"image/0", layout))
  decoded = sp.decode(KEY, sp.bits_as_logits(bits))  # layout found by trying
  assert decoded.layout == layout and decoded.corrected_bytes == 0
  assert _cos(decoded.identity, identity) > 0.9999
  np.testing.assert_allclose(np.linalg.norm(decoded.identity), np.linalg.norm(identity), rtol=1e-6)
  # another face (context) -> another nonce -> unrelated bits
  other = sp.encode(KEY, identity, b"image/1", layout)
  assert 0.4 < np.mean(other != bits) < 0.6


def test_quantization_cosine_and_edge_cases():
  for seed in range(5):
    identity = _identity(seed)
    assert _cos(sp.dequantize(sp.quantize(identity)), identity) > 0.9999
  np.testing.assert_array_equal(sp.dequantize(sp.quantize(np.zeros(512))), np.zeros(512))
  with pytest.raises(ValueError, match="finite"):
    sp.quantize(np.full(512, np.nan))
  with pytest.raises(ValueError, match="512"):
    sp.quantize(np.ones(10))


@pytest.mark.parametrize("layout", sp.LAYOUTS)
def test_survives_two_percent_random_bit_errors(layout):
  rng = np.random.default_rng(1)
  identity = _identity(1)
  bits = sp.encode(KEY, identity, b"face", layout)
  for _ in range(10):
    noisy = _flip(bits, 0.02, rng)
    decoded = sp.decode(KEY, sp.bits_as_logits(noisy), layout)
    assert decoded.corrected_bytes > 0
    assert _cos(decoded.identity, identity) > 0.9999


def test_soft_information_rescues_unreliable_bytes():
  """Too many byte errors for hard decisions, but all in low-confidence bytes."""
  lay = sp.layout("uniform")
  bits = sp.encode(KEY, _identity(2), b"face", "uniform")
  logits = sp.bits_as_logits(bits) * 4.0
  flat = logits.reshape(-1)
  bad_bytes = lay.byte_order[:120]  # 120 > 93 correctable errors, all in codeword 0
  bit_index = lay.slots.reshape(-1, 8)[bad_bytes, 0]
  flat[bit_index] = -np.sign(flat[bit_index]) * 0.1  # wrong, and unsure
  with pytest.raises(sp.NoPayloadError):
    sp.decode(KEY, sp.bits_as_logits(logits > 0), "uniform")
  decoded = sp.decode(KEY, logits, "uniform")
  assert _cos(decoded.identity, _identity(2)) > 0.9999


def test_wrong_key_fails_authentication_every_time():
  rng = np.random.default_rng(3)
  for trial in range(20):
    layout = sp.LAYOUTS[trial % 2]
    bits = _flip(sp.encode(KEY, _identity(trial), b"t%d" % trial, layout), 0.01, rng)
    with pytest.raises(sp.AuthenticationError):
      sp.decode(keys.generate(), sp.bits_as_logits(bits))


def _frame(message: bytes, layout: str) -> np.ndarray:
  """Reference framing of arbitrary message bytes (reedsolo codewords, byte order)."""
  lay = sp.layout(layout)
  message += bytes(lay.n_codewords * lay.data_bytes - len(message))
  rs = reedsolo.RSCodec(lay.parity_bytes, nsize=255)
  coded = b"".join(bytes(rs.encode(message[i * lay.data_bytes:(i + 1) * lay.data_bytes]))
                   for i in range(lay.n_codewords))
  coded = np.frombuffer(coded.ljust(lay.n_bytes, b"\0"), np.uint8)
  stream = np.empty_like(coded)
  stream[lay.byte_order] = coded
  bits = np.zeros(16384, np.float32)
  bits[lay.slots] = np.unpackbits(stream)
  return bits.reshape(512, 32)


def _message(bits: np.ndarray, layout: str) -> bytes:
  lay = sp.layout(layout)
  stream = np.packbits(bits.reshape(-1)[lay.slots].astype(np.uint8))
  coded = stream[lay.byte_order].tobytes()
  return b"".join(coded[i * 255:i * 255 + lay.data_bytes]
                  for i in range(lay.n_codewords))  # padding included


@pytest.mark.parametrize("layout", sp.LAYOUTS)
def test_message_is_version_nonce_and_aes_gcm_siv_ciphertext(layout):
  identity = _identity(4)
  bits = sp.encode(KEY, identity, b"face", layout)
  message = _message(bits, layout)
  nonce, sealed = message[1:13], message[13:sp.MESSAGE_BYTES]
  mask = hashlib.shake_256(b"g2face/secure/v1/filler/" + nonce).digest(1)[0]
  assert message[0] ^ mask == sp.FORMAT_VERSION
  aad = b"g2face-secure-payload" + bytes([sp.FORMAT_VERSION]) + layout.encode()
  plaintext = AESGCMSIV(KEY.subkey("payload")).decrypt(nonce, sealed, aad)
  assert plaintext == sp.quantize(identity)
  reference = _frame(message, layout)
  lay = sp.layout(layout)
  in_codewords = lay.slots.reshape(-1, 8)[lay.byte_order[:lay.n_codewords * 255]].ravel()
  np.testing.assert_array_equal(bits.reshape(-1)[in_codewords],
                                reference.reshape(-1)[in_codewords])


def test_tampered_payload_is_detected():
  message = bytearray(_message(sp.encode(KEY, _identity(5), b"face", "float"), "float"))
  message[40] ^= 0x01  # one ciphertext bit, with a valid error-correcting code around it
  with pytest.raises(sp.AuthenticationError):
    sp.decode(KEY, sp.bits_as_logits(_frame(bytes(message), "float")), "float")
  message[40] ^= 0x01
  message[0] ^= sp.FORMAT_VERSION ^ 7  # unknown format version (the mask stays)
  with pytest.raises(sp.PayloadError, match="version 7"):
    sp.decode(KEY, sp.bits_as_logits(_frame(bytes(message), "float")), "float")


def test_heavy_damage_and_foreign_bits_are_no_payload():
  rng = np.random.default_rng(6)
  bits = sp.encode(KEY, _identity(6), b"face", "float")
  with pytest.raises(sp.NoPayloadError):
    sp.decode(KEY, sp.bits_as_logits(_flip(bits, 0.2, rng)))
  with pytest.raises(sp.NoPayloadError):
    sp.decode(KEY, rng.standard_normal((512, 32)))  # random logits
  official = np.asarray(payload.float_to_bits(_identity(6)[None]))[0]
  with pytest.raises(sp.NoPayloadError):
    sp.decode(KEY, sp.bits_as_logits(official))


def test_bits_look_balanced_without_the_key():
  lay = sp.layout("float")
  batch = np.stack([sp.encode(keys.Key(bytes([i]) * 32), _identity(i), b"face", "float")
                    for i in range(48)]).reshape(48, -1)
  coded = batch[:, lay.slots]
  # each payload alone: half ones (sd 0.0045 for 12288 fair bits)
  assert np.all(np.abs(coded.mean(axis=1) - 0.5) < 0.025)
  # each position across payloads: binomial(48, 1/2), |mean - 0.5| > 0.3 is a 4.2-sigma event
  per_position = coded.mean(axis=0)
  assert abs(per_position.mean() - 0.5) < 0.01 and np.mean(np.abs(per_position - 0.5) > 0.3) < 1e-3
  # the same identity under another key shares nothing visible
  a = sp.encode(keys.generate(), _identity(0), b"face", "float")
  b = sp.encode(keys.generate(), _identity(0), b"face", "float")
  assert 0.45 < np.mean(a.reshape(-1)[lay.slots] != b.reshape(-1)[lay.slots]) < 0.55


def test_float_layout_exponents_look_like_normal_floats_and_are_ignored():
  batch = np.stack([sp.encode(KEY, _identity(0), b"face%d" % i, "float") for i in range(64)])
  exponents = batch[:, :, 1:9].reshape(-1, 8)
  normals = np.random.default_rng(7).standard_normal(exponents.shape[0]).astype(np.float32)
  expected = np.asarray(payload.float_to_bits(normals))[:, 1:9]
  np.testing.assert_allclose(exponents.mean(axis=0), expected.mean(axis=0), atol=0.01)
  bits = batch[0].copy()
  bits[:, 1:9] = 1 - bits[:, 1:9]
  decoded = sp.decode(KEY, sp.bits_as_logits(bits), "float")
  assert decoded.corrected_bytes == 0
