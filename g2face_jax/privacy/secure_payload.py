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
  fit-MMMMMMMM-vVVVV-nN-qQ  (format version 2) a layout fitted to a bundle's
           measured channel (`privacy.code_fit`): coded bits in the positions
           of the 32-bit mask M (bit 31 = position 0, the sign) of the values in
           the groups of the 16-bit mask V (bit 15 = values 0-31, then the next
           VALUE_GROUP values each), in slots ordered by a public permutation; each Reed-Solomon byte written as a codeword of
           N bits of a binary [N, 8] inner code (`inner_code`; N = 8: the byte
           itself), decoded by soft maximum likelihood (the codeword of the
           largest correlation with the logits); shortened Reed-Solomon
           codewords filling what the slots hold; the identity sent with Q
           bits per value (Q = 8: as above; Q < 8: clipped uniform steps of the
           value's RMS, see `quantize`). The message carries the layout in its
           public header: version (2) | nonce (12) | M (4) | V (2) | N (1) |
           Q (1) | ciphertext + tag, the header bytes masked like the version
           byte. Exponent positions outside the code carry the N(0, 1) exponent
           cover, other unused slots bits drawn from the nonce.

Decode: hard bits are logit > 0 (fitted layouts: the inner code's most likely
byte); when hard-decision decoding of a codeword fails, its least reliable
bytes (smallest |logit| of their 8 bits; the inner decoder's margin between
its two best bytes) are erased and decoding is retried (errors-and-erasures
decoding). The layouts tried are the one named (a stamp's), else the caller's
candidates in turn, else the fixed layouts; the layout's name and, in version
2, the header are associated data of the encryption. No key is needed to find
the payload (Reed-Solomon succeeds or not); the key is needed to read it: a
wrong key or a tampered payload or header fails authentication.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import re
import struct
from typing import Sequence

import numpy as np
import reedsolo
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from scipy import special

from g2face_jax.privacy import keys

FORMAT_VERSION = 1  # the fixed layouts' message format
FITTED_VERSION = 2  # the fitted layouts' message format (layout in the public header)
IDENTITY_DIM = 512
VALUE_BITS = 32
N_BITS = IDENTITY_DIM * VALUE_BITS
CODEWORD = 255  # Reed-Solomon codeword length in bytes over GF(256)
NONCE_BYTES = 12
TAG_BYTES = 16
PLAINTEXT_BYTES = 4 + IDENTITY_DIM  # float32 norm + int8 direction
MESSAGE_BYTES = 1 + NONCE_BYTES + PLAINTEXT_BYTES + TAG_BYTES
HEADER_BYTES = 8  # fitted layouts: masks of positions (4) and value groups (2), N (1), Q (1)
VALUE_GROUP = 32  # values per group of a fitted layout's value mask
N_GROUPS = IDENTITY_DIM // VALUE_GROUP
VALUE_BIT_CHOICES = (8, 6, 5)  # bits per identity value a fitted layout may send (cosine >= 0.99)
INNER_LENGTHS = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64)  # bits per byte
INNER_TRIALS = 64  # random systematic [N, 8] codes drawn; the best distance is kept
# clip of the Q-bit quantizer in units of the identity's RMS value, about the
# mean-square-error optimum of uniform steps for a Gaussian
QUANT_CLIP = {6: 3.3, 5: 2.9}
_FITTED = re.compile(r"fit-([0-9a-f]{8})-v([0-9a-f]{4})-n([0-9]{1,2})-q([0-9])")
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
  slots: np.ndarray       # flat indices into the 16384 bits that carry coded bits; payload
                          # byte i sits in slots[i * inner : (i + 1) * inner]
  n_codewords: int
  data_bytes: int         # message bytes per codeword (the message is padded)
  byte_order: np.ndarray  # coded byte i sits at payload byte byte_order[i]
  codeword_bytes: int = CODEWORD  # bytes per (shortened) Reed-Solomon codeword
  inner: int = 8          # bits per payload byte (the inner code length; 8: uncoded)
  value_bits: int = 8     # bits per identity value in the plaintext
  version: int = FORMAT_VERSION
  mask: int | None = None  # fitted layouts: the 32-bit position mask (bit 31 = the sign)
  groups: int | None = None  # fitted layouts: the 16-bit value-group mask (bit 15 = values 0-31)

  @property
  def parity_bytes(self) -> int:
    return self.codeword_bytes - self.data_bytes

  @property
  def n_bytes(self) -> int:
    return len(self.slots) // self.inner

  @property
  def positions(self) -> np.ndarray:
    """The bit positions within a value (0 = sign, 1-8 exponent, 9-31 mantissa) that carry coded bits."""
    return np.unique(self.slots % VALUE_BITS)

  @property
  def header(self) -> bytes:
    """The public header of a fitted layout's message (b'' for the fixed layouts)."""
    return b"" if self.version == FORMAT_VERSION else struct.pack(
        ">IHBB", self.mask, self.groups, self.inner, self.value_bits)

  @property
  def message_bytes(self) -> int:
    return message_bytes(self.value_bits, self.version)


def message_bytes(value_bits: int = 8, version: int = FORMAT_VERSION) -> int:
  """Bytes of the message (version, nonce, header, ciphertext and tag) for `value_bits`
  bits per identity value."""
  header = 0 if version == FORMAT_VERSION else HEADER_BYTES
  return 1 + NONCE_BYTES + header + 4 + IDENTITY_DIM * value_bits // 8 + TAG_BYTES


def _mask(members: Sequence[int], width: int) -> int:
  return sum(1 << (width - 1 - int(m)) for m in set(int(m) for m in members))


def _members(mask: int, width: int) -> list[int]:
  return [m for m in range(width) if mask >> (width - 1 - m) & 1]


def fitted_name(positions: Sequence[int], inner: int, value_bits: int,
                groups: Sequence[int] = range(N_GROUPS)) -> str:
  """The name of the fitted layout with coded bits in `positions` (0-31) of the values in
  `groups` (0-15, VALUE_GROUP values each), each byte an `inner`-bit codeword, sending
  `value_bits` bits per identity value."""
  return (f"fit-{_mask(positions, VALUE_BITS):08x}-v{_mask(groups, N_GROUPS):04x}"
          f"-n{int(inner)}-q{int(value_bits)}")


def _public_stream(label: bytes, n: int) -> bytes:
  return hashlib.shake_256(b"g2face/secure/v1/" + label).digest(n)


def _public_uniforms(label: bytes, n: int) -> np.ndarray:
  words = np.frombuffer(_public_stream(label, 4 * n), "<u4").astype(np.float64)
  return (words + 0.5) / 2.0 ** 32


def geometry(n_slots: int, inner: int, value_bits: int) -> tuple[int, int, int]:
  """(codewords, bytes per codeword, message bytes per codeword) of a fitted layout with
  `n_slots` slots for coded bits; ValueError when they cannot hold the message with
  MIN_CHECK_BYTES parity bytes per codeword."""
  n_bytes = n_slots // inner
  message = message_bytes(value_bits, FITTED_VERSION)
  n_codewords = max(1, -(-n_bytes // CODEWORD))
  codeword_bytes = n_bytes // n_codewords
  data_bytes = -(-message // n_codewords)
  if codeword_bytes - data_bytes < MIN_CHECK_BYTES:
    raise ValueError(f"{n_bytes} coded bytes cannot carry a {message}-byte message with "
                     f"{MIN_CHECK_BYTES} parity bytes per codeword")
  return n_codewords, codeword_bytes, data_bytes


@functools.lru_cache(maxsize=256)
def layout(name: str) -> Layout:
  """The named bit layout: one of LAYOUTS or a fitted layout name (`fitted_name`).
  ValueError for an unknown name or a fitted layout too small for the message."""
  if name in ("float", "uniform"):
    if name == "float":
      slots = (np.arange(IDENTITY_DIM)[:, None] * VALUE_BITS + SIGN_AND_MANTISSA).ravel()
    else:
      slots = np.arange(N_BITS)
    n_bytes = len(slots) // 8
    n_codewords = n_bytes // CODEWORD
    data_bytes = -(-MESSAGE_BYTES // n_codewords)
    order = np.argsort(_public_uniforms(b"byte-order/" + name.encode(), n_bytes), kind="stable")
    return Layout(name, slots, n_codewords, data_bytes, order)
  match = _FITTED.fullmatch(str(name))
  if match is None:
    raise ValueError(f"unknown payload layout '{name}'; known: {', '.join(LAYOUTS)} "
                     "or fit-MASK-vGROUPS-nN-qQ (`g2face calibrate`)")
  mask, groups = int(match[1], 16), int(match[2], 16)
  inner, value_bits = int(match[3]), int(match[4])
  positions, members = _members(mask, VALUE_BITS), _members(groups, N_GROUPS)
  if not positions or not members or inner not in INNER_LENGTHS or value_bits not in \
      VALUE_BIT_CHOICES or name != fitted_name(positions, inner, value_bits, members):
    raise ValueError(f"payload layout '{name}': needs non-empty masks, an inner code of "
                     f"{'/'.join(map(str, INNER_LENGTHS))} bits and "
                     f"{'/'.join(map(str, VALUE_BIT_CHOICES))} bits per value")
  values = (np.asarray(members)[:, None] * VALUE_GROUP + np.arange(VALUE_GROUP)).ravel()
  candidates = (values[:, None] * VALUE_BITS + np.asarray(positions)).ravel()
  n_bytes = len(candidates) // inner
  try:
    n_codewords, codeword_bytes, data_bytes = geometry(len(candidates), inner, value_bits)
  except ValueError as e:
    raise ValueError(f"payload layout '{name}': {e}") from None
  shuffle = np.argsort(_public_uniforms(b"slots/" + name.encode(), len(candidates)), kind="stable")
  slots = candidates[shuffle[:n_bytes * inner]]
  order = np.argsort(_public_uniforms(b"byte-order/" + name.encode(), n_bytes), kind="stable")
  return Layout(name, slots, n_codewords, data_bytes, order, codeword_bytes, inner,
                value_bits, FITTED_VERSION, mask, groups)


@functools.lru_cache(maxsize=None)
def _rs(parity_bytes: int) -> reedsolo.RSCodec:
  return reedsolo.RSCodec(parity_bytes, nsize=CODEWORD)


def _aad(lay: Layout) -> bytes:
  return b"g2face-secure-payload" + bytes([lay.version]) + lay.name.encode() + lay.header


def quantize(identity: np.ndarray, value_bits: int = 8) -> bytes:
  """(512,) identity -> 4 + 64 * value_bits bytes: the float32 norm, then the direction.

  8 bits: int8, scaled so that the largest |value| is 127. Fewer bits (Q): each value
  rounded to steps of QUANT_CLIP[Q] / (2^(Q-1) - 1) times the identity's RMS value,
  clipped to +-(2^(Q-1) - 1) steps, stored offset by 2^(Q-1) - 1 as Q bits, most
  significant first.
  """
  identity = np.asarray(identity, np.float64)
  if identity.shape != (IDENTITY_DIM,) or not np.all(np.isfinite(identity)):
    raise ValueError(f"identity must be {IDENTITY_DIM} finite values, got shape {identity.shape}")
  if value_bits not in VALUE_BIT_CHOICES:
    raise ValueError(f"bits per value must be one of {VALUE_BIT_CHOICES}, got {value_bits}")
  norm = np.linalg.norm(identity)
  if value_bits == 8:
    peak = np.abs(identity).max()
    q = np.zeros(IDENTITY_DIM, np.int8) if peak == 0 else np.round(identity / peak * 127).astype(np.int8)
    return struct.pack("<f", norm) + q.tobytes()
  top = 2 ** (value_bits - 1) - 1
  step = QUANT_CLIP[value_bits] * norm / np.sqrt(IDENTITY_DIM) / top
  levels = np.zeros(IDENTITY_DIM, np.int64) if norm == 0 else \
      np.clip(np.round(identity / step), -top, top).astype(np.int64)
  codes = ((levels + top)[:, None] >> np.arange(value_bits - 1, -1, -1)) & 1
  return struct.pack("<f", norm) + np.packbits(codes.astype(np.uint8)).tobytes()


def dequantize(data: bytes, value_bits: int = 8) -> np.ndarray:
  """The bytes of `quantize` -> (512,) float32 identity of the stored norm."""
  (norm,) = struct.unpack("<f", data[:4])
  if value_bits == 8:
    v = np.frombuffer(data[4:], np.int8).astype(np.float64)
  else:
    codes = np.unpackbits(np.frombuffer(data[4:], np.uint8))[:IDENTITY_DIM * value_bits]
    weights = 1 << np.arange(value_bits - 1, -1, -1)
    v = (codes.reshape(IDENTITY_DIM, value_bits) @ weights).astype(np.float64) - (
        2 ** (value_bits - 1) - 1)
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


@functools.lru_cache(maxsize=None)
def inner_code(n: int) -> np.ndarray:
  """(256, n) uint8: the bits of byte b's codeword in the [n, 8] inner code. n = 8: the
  byte's own bits. Else the systematic code [byte | byte @ P mod 2] whose 8 x (n - 8) P,
  of INNER_TRIALS drawn from a public stream, has the largest minimum distance (then the
  fewest codewords at it)."""
  data = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int64)
  if n == 8:
    return data.astype(np.uint8)
  best, best_key = None, None
  for trial in range(INNER_TRIALS):
    parity = np.unpackbits(np.frombuffer(_public_stream(b"inner/%d/%d" % (n, trial),
                                                        n - 8), np.uint8))
    words = np.concatenate([data, data @ parity.reshape(8, n - 8) % 2], axis=1)
    weights = words[1:].sum(axis=1)
    key = (weights.min(), -np.sum(weights == weights.min()))
    if best_key is None or key > best_key:
      best, best_key = words, key
  return best.astype(np.uint8)


def inner_weights(n: int) -> np.ndarray:
  """(n + 1,) counts of the inner code's non-zero codewords of each weight (its distance
  distribution, the code being linear)."""
  return np.bincount(inner_code(n)[1:].sum(axis=1), minlength=n + 1)


def _header_mask(nonce: bytes) -> bytes:
  return _public_stream(b"header/" + nonce, HEADER_BYTES)


def encode(key: keys.Key, identity: np.ndarray, context: bytes,
           layout_name: str = DEFAULT_LAYOUT) -> np.ndarray:
  """One face's identity (512,) -> bits (512, 32) float32 in {0, 1}.

  `context` names the face (e.g. image digest and face index); with the
  identity it fixes the nonce, so the same inputs give the same bits.
  """
  lay = layout(layout_name)
  plaintext = quantize(identity, lay.value_bits)
  nonce = hmac.new(key.subkey("nonce"), context + plaintext, hashlib.sha256).digest()[:NONCE_BYTES]
  sealed = AESGCMSIV(key.subkey("payload")).encrypt(nonce, plaintext, _aad(lay))
  filler = _filler(nonce, lay.n_bytes)
  header = bytes(a ^ b for a, b in zip(lay.header, _header_mask(nonce)))
  message = bytes([lay.version ^ filler[0]]) + nonce + header + sealed
  message += filler[1:1 + lay.n_codewords * lay.data_bytes - len(message)]
  rs = _rs(lay.parity_bytes)
  coded = b"".join(bytes(rs.encode(message[i * lay.data_bytes:(i + 1) * lay.data_bytes]))
                   for i in range(lay.n_codewords))
  coded = np.frombuffer(coded + filler[len(coded):], np.uint8)
  payload = np.empty(lay.n_bytes, np.uint8)
  payload[lay.byte_order] = coded
  if lay.version == FORMAT_VERSION:
    bits = np.zeros(N_BITS, np.float32)
  else:  # slots outside the code: bytes drawn from the nonce
    bits = np.unpackbits(np.frombuffer(_public_stream(b"cover/" + nonce, N_BITS // 8),
                                       np.uint8)).astype(np.float32)
  if lay.name != "uniform":  # exponent positions: the cover, where the code leaves them
    bits.reshape(IDENTITY_DIM, VALUE_BITS)[:, EXPONENT] = _exponent_cover(nonce)
  bits[lay.slots] = inner_code(lay.inner)[payload].ravel()
  return bits.reshape(IDENTITY_DIM, VALUE_BITS)


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


def _read_bytes(logits: np.ndarray, lay: Layout) -> tuple[np.ndarray, np.ndarray]:
  """(512, 32) logits -> (payload bytes (n_bytes,) uint8, their reliabilities): hard bits
  and their smallest |logit| uncoded; else the inner code's most likely byte (largest
  correlation) and its margin over the runner-up."""
  flat = logits.reshape(-1)[lay.slots]
  if lay.inner == 8:
    return np.packbits(flat > 0), np.abs(flat).reshape(-1, 8).min(axis=1)
  scores = flat.reshape(-1, lay.inner) @ (2.0 * inner_code(lay.inner) - 1).T  # (n_bytes, 256)
  top = np.argpartition(-scores, 1, axis=1)[:, :2]
  pair = np.take_along_axis(scores, top, axis=1)
  first = np.argmax(pair, axis=1)
  best = np.take_along_axis(top, first[:, None], axis=1)[:, 0]
  return best.astype(np.uint8), np.abs(pair[:, 0] - pair[:, 1])


def _read_message(logits: np.ndarray, lay: Layout) -> tuple[bytes, int]:
  payload, byte_rel = _read_bytes(logits, lay)
  coded = payload[lay.byte_order]
  rel = byte_rel[lay.byte_order]
  rs = _rs(lay.parity_bytes)
  parts, corrected = [], 0
  for i in range(lay.n_codewords):
    span = slice(i * lay.codeword_bytes, (i + 1) * lay.codeword_bytes)
    part, n = _decode_codeword(rs, bytearray(coded[span].tobytes()), rel[span], lay.parity_bytes)
    parts.append(part)
    corrected += n
  return b"".join(parts)[:lay.message_bytes], corrected


def candidates(layout_name: str | Sequence[str] | None) -> tuple[str, ...]:
  """The layouts `decode` tries: the name given, the names given in order, or (None) LAYOUTS."""
  if layout_name is None:
    return LAYOUTS
  return (layout_name,) if isinstance(layout_name, str) else tuple(dict.fromkeys(layout_name))


def decode(key: keys.Key, logits: np.ndarray,
           layout_name: str | Sequence[str] | None = None) -> Decoded:
  """Extractor logits (512, 32) (or bits in {0, 1} as +-1 logits via `bits_as_logits`)
  -> the decoded identity. `layout_name`: the layout, or layouts to try in order;
  None tries the fixed LAYOUTS.

  Raises NoPayloadError when no layout's code decodes, AuthenticationError when
  the code decodes but the key does not open it, PayloadError for an unknown version.
  """
  logits = np.asarray(logits, np.float32)
  if logits.shape != (IDENTITY_DIM, VALUE_BITS):
    raise ValueError(f"logits must be ({IDENTITY_DIM}, {VALUE_BITS}), got {logits.shape}")
  found = None
  for name in candidates(layout_name):
    try:
      found = (layout(name),) + _read_message(logits, layout(name))
      break
    except NoPayloadError:
      continue
  if found is None:
    raise NoPayloadError("no g2face secure payload found (or damaged beyond repair)")
  lay, message, corrected = found
  nonce = message[1:1 + NONCE_BYTES]
  version = message[0] ^ _filler(nonce, 1)[0]
  if version != lay.version:
    raise PayloadError(f"unsupported secure payload version {version}")
  start = 1 + NONCE_BYTES + len(lay.header)
  header = bytes(a ^ b for a, b in zip(message[1 + NONCE_BYTES:start], _header_mask(nonce)))
  if header != lay.header:
    raise AuthenticationError("payload authentication failed: its header names another layout")
  try:
    plaintext = AESGCMSIV(key.subkey("payload")).decrypt(nonce, message[start:], _aad(lay))
  except InvalidTag:
    raise AuthenticationError("payload authentication failed: wrong key or tampered payload") from None
  return Decoded(dequantize(plaintext, lay.value_bits), lay.name, corrected)


def bits_as_logits(bits: np.ndarray) -> np.ndarray:
  """Hard bits {0, 1} -> logits +-1 (no reliability information)."""
  return np.asarray(bits, np.float32) * 2 - 1
