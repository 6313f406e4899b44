"""The keyed codec of the 16384 hidden bits: identity -> encrypted, authenticated,
error-corrected bits, and back from the extractor's logits.

Encode (per face):
  identity (512,) float32 -> plaintext: |identity| as float32 + the unit
  direction quantized to int8 (scaled so the largest |value| is 127), 516 bytes
  -> AES-GCM-SIV with the key's payload sub-key, a 12-byte nonce (HMAC of the
  nonce sub-key over the face's context and the plaintext) and the format
  version and layout as associated data
  -> message = version (1) | nonce (12) | ciphertext + tag (532) = 545 bytes,
  the version byte masked and the padding filled with bytes drawn from the
  nonce (no position is the same in every payload)
  -> split over n Reed-Solomon codewords of 255 bytes (GF(256), `reedsolo`)
  -> bytes shuffled over the payload by a public
  pseudo-random permutation (a damaged image region hits few bytes of many
  codewords) -> bits, most significant first, into the layout's slots.

Layouts of the (512, 32) bit tensor (value i's 32 bits: sign, 8 exponent, 23
mantissa, as the official codec writes float32s):
  float    (default) coded bits in the 24 sign and mantissa positions of every
           value (12288 bits = 6 codewords, 164 parity bytes each: corrects 82
           byte errors per codeword); the 8 exponent positions carry the
           exponent of an N(0, 1) float32, as in the official training bits
           (the official extractor saw those positions near-constant).
  uniform  coded bits in all 16384 positions (8 codewords, 186 parity bytes each).

Decode: hard bits are logit > 0; when hard-decision decoding of a codeword
fails, its least reliable bytes (smallest |logit| of their 8 bits) are
erased and decoding is retried (errors-and-erasures decoding).
No key is needed to find the payload (Reed-Solomon succeeds or not); the key
is needed to read it: a wrong key or a tampered payload fails authentication.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import struct

import numpy as np
import reedsolo
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from scipy import special

from g2face_jax.privacy import keys

FORMAT_VERSION = 1
IDENTITY_DIM = 512
VALUE_BITS = 32
N_BITS = IDENTITY_DIM * VALUE_BITS
CODEWORD = 255  # Reed-Solomon codeword length in bytes over GF(256)
NONCE_BYTES = 12
TAG_BYTES = 16
PLAINTEXT_BYTES = 4 + IDENTITY_DIM  # float32 norm + int8 direction
MESSAGE_BYTES = 1 + NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
LAYOUTS = ("float", "uniform")
DEFAULT_LAYOUT = "float"
SIGN_AND_MANTISSA = np.r_[0, 9:VALUE_BITS]  # bit positions within a value
EXPONENT = np.arange(1, 9)
MIN_CHECK_BYTES = 32  # parity bytes kept un-erased, so erasure decoding still detects a non-payload


class PayloadError(ValueError):
  """A payload that cannot be read."""


class NoPayloadError(PayloadError):
  """No secure payload in the bits (or too damaged for the error-correcting code)."""


class AuthenticationError(PayloadError):
  """The payload decodes but does not authenticate: wrong key, or tampered."""


@dataclasses.dataclass(frozen=True)
class Decoded:
  identity: np.ndarray  # (512,) float32
  layout: str
  corrected_bytes: int  # byte errors and erasures the code repaired


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  slots: np.ndarray       # flat indices into the 16384 bits that carry coded bits
  n_codewords: int
  data_bytes: int         # message bytes per codeword (the message is zero-padded)
  byte_order: np.ndarray  # coded byte i sits at payload byte byte_order[i]

  @property
  def parity_bytes(self) -> int:
    return CODEWORD - self.data_bytes

  @property
  def n_bytes(self) -> int:
    return len(self.slots) // 8


def _public_stream(label: bytes, n: int) -> bytes:
  return hashlib.shake_256(b"g2face/secure/v1/" + label).digest(n)


def _public_uniforms(label: bytes, n: int) -> np.ndarray:
  words = np.frombuffer(_public_stream(label, 4 * n), "<u4").astype(np.float64)
  return (words + 0.5) / 2.0 ** 32


@functools.lru_cache(maxsize=None)
def layout(name: str) -> Layout:
  """The named bit layout (one of LAYOUTS)."""
  if name == "float":
    slots = (np.arange(IDENTITY_DIM)[:, None] * VALUE_BITS + SIGN_AND_MANTISSA).ravel()
  elif name == "uniform":
    slots = np.arange(N_BITS)
  else:
    raise ValueError(f"unknown payload layout '{name}'; known: {', '.join(LAYOUTS)}")
  n_bytes = len(slots) // 8
  n_codewords = n_bytes // CODEWORD
  data_bytes = -(-MESSAGE_BYTES // n_codewords)
  order = np.argsort(_public_uniforms(b"byte-order/" + name.encode(), n_bytes), kind="stable")
  return Layout(name, slots, n_codewords, data_bytes, order)


@functools.lru_cache(maxsize=None)
def _rs(parity_bytes: int) -> reedsolo.RSCodec:
  return reedsolo.RSCodec(parity_bytes, nsize=CODEWORD)


def _aad(lay: Layout) -> bytes:
  return b"g2face-secure-payload" + bytes([FORMAT_VERSION]) + lay.name.encode()


def quantize(identity: np.ndarray) -> bytes:
  """(512,) identity -> 516 bytes: float32 norm, then the direction as int8."""
  identity = np.asarray(identity, np.float64)
  if identity.shape != (IDENTITY_DIM,) or not np.all(np.isfinite(identity)):
    raise ValueError(f"identity must be {IDENTITY_DIM} finite values, got shape {identity.shape}")
  norm = np.linalg.norm(identity)
  peak = np.abs(identity).max()
  q = np.zeros(IDENTITY_DIM, np.int8) if peak == 0 else np.round(identity / peak * 127).astype(np.int8)
  return struct.pack("<f", norm) + q.tobytes()


def dequantize(data: bytes) -> np.ndarray:
  """516 bytes -> (512,) float32 identity of the stored norm."""
  (norm,) = struct.unpack("<f", data[:4])
  v = np.frombuffer(data[4:], np.int8).astype(np.float64)
  length = np.linalg.norm(v)
  return (v * (norm / length) if length > 0 else v).astype(np.float32)


def _exponent_cover(seed: bytes) -> np.ndarray:
  """(512, 8) exponent bits of N(0, 1) float32 samples drawn from `seed`."""
  values = special.ndtri(_public_uniforms(b"exponents/" + seed, IDENTITY_DIM)).astype(np.float32)
  exponent = (values.view(np.uint32) >> 23) & 0xFF
  return ((exponent[:, None] >> np.arange(7, -1, -1, dtype=np.uint32)) & 1).astype(np.float32)


def _filler(nonce: bytes, n: int) -> bytes:
  """Pseudo-random bytes of the nonce: the version mask, the message padding and
  the bytes past the last codeword, so that no position is the same in every payload."""
  return _public_stream(b"filler/" + nonce, n)


def encode(key: keys.Key, identity: np.ndarray, context: bytes,
           layout_name: str = DEFAULT_LAYOUT) -> np.ndarray:
  """One face's identity (512,) -> bits (512, 32) float32 in {0, 1}.

  `context` names the face (e.g. image digest and face index); with the
  identity it fixes the nonce, so the same inputs give the same bits.
  """
  lay = layout(layout_name)
  plaintext = quantize(identity)
  nonce = hmac.new(key.subkey("nonce"), context + plaintext, hashlib.sha256).digest()[:NONCE_BYTES]
  sealed = AESGCMSIV(key.subkey("payload")).encrypt(nonce, plaintext, _aad(lay))
  filler = _filler(nonce, lay.n_bytes)
  message = bytes([FORMAT_VERSION ^ filler[0]]) + nonce + sealed
  message += filler[1:1 + lay.n_codewords * lay.data_bytes - len(message)]
  rs = _rs(lay.parity_bytes)
  coded = b"".join(bytes(rs.encode(message[i * lay.data_bytes:(i + 1) * lay.data_bytes]))
                   for i in range(lay.n_codewords))
  coded = np.frombuffer(coded + filler[len(coded):], np.uint8)
  payload = np.empty(lay.n_bytes, np.uint8)
  payload[lay.byte_order] = coded
  bits = np.zeros(N_BITS, np.float32)
  bits[lay.slots] = np.unpackbits(payload)
  bits = bits.reshape(IDENTITY_DIM, VALUE_BITS)
  if lay.name == "float":
    bits[:, EXPONENT] = _exponent_cover(nonce)
  return bits


def _erasure_counts(parity_bytes: int) -> list[int]:
  top = parity_bytes - MIN_CHECK_BYTES
  return sorted({max(1, top * k // 4) for k in (1, 2, 3, 4)})


def _decode_codeword(rs: reedsolo.RSCodec, word: bytearray, reliability: np.ndarray,
                     parity_bytes: int) -> tuple[bytes, int]:
  """(message bytes, corrected count); hard decision first, then erasing the least reliable."""
  attempts = [None]
  if np.ptp(reliability) > 0:
    order = np.argsort(reliability, kind="stable")
    attempts += [sorted(order[:n].tolist()) for n in _erasure_counts(parity_bytes)]
  for erase in attempts:
    try:
      message, _, errata = rs.decode(word, erase_pos=erase)
      return bytes(message), len(errata)
    except reedsolo.ReedSolomonError:
      continue
  raise NoPayloadError("no g2face secure payload found (or damaged beyond repair)")


def _read_message(logits: np.ndarray, lay: Layout) -> tuple[bytes, int]:
  flat = logits.reshape(-1)[lay.slots]
  payload = np.packbits(flat > 0)
  byte_rel = np.abs(flat).reshape(-1, 8).min(axis=1)
  coded = payload[lay.byte_order]
  rel = byte_rel[lay.byte_order]
  rs = _rs(lay.parity_bytes)
  parts, corrected = [], 0
  for i in range(lay.n_codewords):
    span = slice(i * CODEWORD, (i + 1) * CODEWORD)
    part, n = _decode_codeword(rs, bytearray(coded[span].tobytes()), rel[span], lay.parity_bytes)
    parts.append(part)
    corrected += n
  return b"".join(parts)[:MESSAGE_BYTES], corrected


def decode(key: keys.Key, logits: np.ndarray, layout_name: str | None = None) -> Decoded:
  """Extractor logits (512, 32) (or bits in {0, 1} as +-1 logits via `bits_as_logits`)
  -> the decoded identity. `layout_name` None tries every layout.

  Raises NoPayloadError when no layout's code decodes, AuthenticationError when
  the code decodes but the key does not open it, PayloadError for an unknown version.
  """
  logits = np.asarray(logits, np.float32)
  if logits.shape != (IDENTITY_DIM, VALUE_BITS):
    raise ValueError(f"logits must be ({IDENTITY_DIM}, {VALUE_BITS}), got {logits.shape}")
  found = None
  for name in ([layout_name] if layout_name else LAYOUTS):
    try:
      found = (layout(name),) + _read_message(logits, layout(name))
      break
    except NoPayloadError:
      continue
  if found is None:
    raise NoPayloadError("no g2face secure payload found (or damaged beyond repair)")
  lay, message, corrected = found
  nonce, sealed = message[1:1 + NONCE_BYTES], message[1 + NONCE_BYTES:]
  version = message[0] ^ _filler(nonce, 1)[0]
  if version != FORMAT_VERSION:
    raise PayloadError(f"unsupported secure payload version {version}")
  try:
    plaintext = AESGCMSIV(key.subkey("payload")).decrypt(nonce, sealed, _aad(lay))
  except InvalidTag:
    raise AuthenticationError("payload authentication failed: wrong key or tampered payload") from None
  return Decoded(dequantize(plaintext), lay.name, corrected)


def bits_as_logits(bits: np.ndarray) -> np.ndarray:
  """Hard bits {0, 1} -> logits +-1 (no reliability information)."""
  return np.asarray(bits, np.float32) * 2 - 1
