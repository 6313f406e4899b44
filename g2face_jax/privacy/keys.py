"""Keys: 256-bit key files, passphrase keys, one sub-key per purpose, and the
key-driven draws of the pipeline (virtual identities, decoder noise).

A key is read from a file (`load(path)`) or from the G2FACE_KEY environment
variable (64 hex digits), never from the command line. A key file is JSON
with mode 0600 and is of one of two kinds:
  raw     {"format": "g2face-key", "version": 1, "kind": "raw", "key": HEX}
  scrypt  {..., "kind": "scrypt", "salt": HEX, "n": N, "r": R, "p": P, "check": HEX}
          the key is scrypt(passphrase, salt) (memory-hard); the passphrase
          comes from G2FACE_PASSPHRASE or a prompt, and `check` (an HKDF output
          of the key, not the key) tells a wrong passphrase at once.
Sub-keys are HKDF-SHA256 outputs of the key, one per purpose (PURPOSES).
Gaussian draws come from the ChaCha20 keystream of a sub-key, so they are the
same on every platform and library version.
"""
from __future__ import annotations

import dataclasses
import functools
import getpass
import hashlib
import hmac
import json
import os
import sys
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from scipy import special

KEY_BYTES = 32
KEY_ENV = "G2FACE_KEY"
PASSPHRASE_ENV = "G2FACE_PASSPHRASE"
FILE_FORMAT = "g2face-key"
FILE_VERSION = 1
PURPOSES = ("identity", "noise", "payload", "nonce")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1  # 128 MiB, about a second


class KeyFileError(ValueError):
  """A key that cannot be read or derived (message names the source, never the key)."""


@dataclasses.dataclass(frozen=True)
class Key:
  """A 256-bit master key. Its repr never shows the material."""
  material: bytes = dataclasses.field(repr=False)

  def __post_init__(self):
    if len(self.material) != KEY_BYTES:
      raise KeyFileError(f"a key has {KEY_BYTES} bytes, got {len(self.material)}")

  def __repr__(self) -> str:
    return "Key(<hidden>)"

  def subkey(self, purpose: str) -> bytes:
    """The 32-byte HKDF-SHA256 sub-key of `purpose` (one of PURPOSES)."""
    if purpose not in PURPOSES:
      raise ValueError(f"unknown key purpose '{purpose}'; known: {', '.join(PURPOSES)}")
    return _hkdf(self.material, b"g2face/v1/" + purpose.encode())


def _hkdf(material: bytes, info: bytes) -> bytes:
  return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(material)


def generate() -> Key:
  """A fresh random key from the operating system's CSPRNG."""
  return Key(os.urandom(KEY_BYTES))


def from_passphrase(passphrase: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R,
                    p: int = SCRYPT_P) -> Key:
  """scrypt(passphrase, salt) -> Key."""
  if not passphrase:
    raise KeyFileError("empty passphrase")
  kdf = Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p)
  return Key(kdf.derive(passphrase.encode("utf-8")))


def _check_value(key: Key) -> bytes:
  return _hkdf(key.material, b"g2face/v1/passphrase-check")[:16]


def write_key_file(path: str, key: Key | None = None, *, passphrase: str | None = None,
                   scrypt_n: int = SCRYPT_N) -> Key:
  """Write a new key file (mode 0600, never overwrites) and return its key.

  Without `passphrase`: a raw file holding `key` (default: a fresh random key).
  With `passphrase`: a scrypt file holding a fresh salt; the key is derived.
  """
  if passphrase is not None:
    if key is not None:
      raise ValueError("give either a key or a passphrase, not both")
    salt = os.urandom(16)
    key = from_passphrase(passphrase, salt, n=scrypt_n)
    record = dict(kind="scrypt", salt=salt.hex(), n=scrypt_n, r=SCRYPT_R, p=SCRYPT_P,
                  check=_check_value(key).hex())
  else:
    key = key or generate()
    record = dict(kind="raw", key=key.material.hex())
  text = json.dumps(dict(format=FILE_FORMAT, version=FILE_VERSION, **record), indent=1) + "\n"
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise KeyFileError(f"{path}: already exists (a key file is never overwritten)") from None
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask
  return key


def _ask_passphrase(source: str, env: Mapping[str, str]) -> str:
  if env.get(PASSPHRASE_ENV):
    return env[PASSPHRASE_ENV]
  if sys.stdin is not None and sys.stdin.isatty():
    return getpass.getpass(f"passphrase for {source}: ")
  raise KeyFileError(f"{source}: passphrase key, but no passphrase "
                     f"(set {PASSPHRASE_ENV} or run in a terminal)")


def ask_new_passphrase(env: Mapping[str, str] | None = None) -> str:
  """A new passphrase from G2FACE_PASSPHRASE or typed twice at a prompt."""
  env = os.environ if env is None else env
  if env.get(PASSPHRASE_ENV):
    return env[PASSPHRASE_ENV]
  if sys.stdin is None or not sys.stdin.isatty():
    raise KeyFileError(f"no passphrase (set {PASSPHRASE_ENV} or run in a terminal)")
  first = getpass.getpass("new passphrase: ")
  if first != getpass.getpass("repeat passphrase: "):
    raise KeyFileError("the two passphrases differ")
  return first


def _parse(text: str, source: str, passphrase: str | None, env: Mapping[str, str]) -> Key:
  try:
    record = json.loads(text)
    if record.get("format") != FILE_FORMAT:
      raise KeyFileError(f"{source}: not a g2face key file")
    if record.get("version") != FILE_VERSION:
      raise KeyFileError(f"{source}: unsupported key file version {record.get('version')}")
    if record["kind"] == "raw":
      material = bytes.fromhex(record["key"])
      if len(material) != KEY_BYTES:
        raise KeyFileError(f"{source}: the key must have {KEY_BYTES} bytes, not {len(material)}")
      return Key(material)
    if record["kind"] == "scrypt":
      key = from_passphrase(passphrase if passphrase is not None else _ask_passphrase(source, env),
                            bytes.fromhex(record["salt"]), record["n"], record["r"], record["p"])
      if not hmac.compare_digest(_check_value(key), bytes.fromhex(record["check"])):
        raise KeyFileError(f"{source}: wrong passphrase")
      return key
    raise KeyFileError(f"{source}: unknown key kind '{record['kind']}'")
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
    raise KeyFileError(f"{source}: not a valid g2face key file") from None
  except ValueError as e:  # bad hex, wrong length, bad scrypt parameters
    if isinstance(e, KeyFileError):
      raise
    raise KeyFileError(f"{source}: not a valid g2face key file") from None


def load(path: str | None = None, *, passphrase: str | None = None,
         env: Mapping[str, str] | None = None) -> Key:
  """The key of the file at `path`, or (path None) of the G2FACE_KEY variable (64 hex digits)."""
  env = os.environ if env is None else env
  if path is None:
    if not env.get(KEY_ENV):
      raise KeyFileError(f"no key: pass a key file or set {KEY_ENV}")
    try:
      material = bytes.fromhex(env[KEY_ENV].strip())
      if len(material) != KEY_BYTES:
        raise ValueError
      return Key(material)
    except ValueError:
      raise KeyFileError(f"{KEY_ENV}: not {2 * KEY_BYTES} hex digits") from None
  try:
    with open(path, "rb") as f:
      data = f.read(1 << 16)
  except OSError as e:
    raise KeyFileError(f"{path}: cannot read key file ({e.strerror or e})") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    raise KeyFileError(f"{path}: not a valid g2face key file") from None
  return _parse(text, path, passphrase, env)


# --- key-driven draws ---

def gaussian(subkey: bytes, context: bytes, shape: Sequence[int]) -> np.ndarray:
  """N(0, 1) float32 array of `shape`, a function of (subkey, context) only.

  ChaCha20 keystream (key = subkey, nonce = SHA-256(context)[:16]) -> uint32 ->
  uniform (k + 0.5) / 2^32 -> inverse normal CDF.
  """
  n = int(np.prod(shape, dtype=np.int64))
  nonce = hashlib.sha256(context).digest()[:16]
  stream = Cipher(algorithms.ChaCha20(subkey, nonce), mode=None).encryptor().update(
      bytes(4 * n))
  u = (np.frombuffer(stream, "<u4").astype(np.float64) + 0.5) / 2.0 ** 32
  return special.ndtri(u).astype(np.float32).reshape(tuple(shape))


@functools.lru_cache(maxsize=4)
def _orthogonal(subkey: bytes, dim: int) -> np.ndarray:
  g = gaussian(subkey, b"g2face/orthogonal/%d" % dim, (dim, dim)).astype(np.float64)
  q, r = np.linalg.qr(g)
  return q * np.sign(np.diag(r))  # Haar-distributed rotation of the key


def orthogonal(key: Key, dim: int = 512) -> np.ndarray:
  """(dim, dim) float64 orthogonal matrix of the key's identity sub-key."""
  return _orthogonal(key.subkey("identity"), dim)


def consistent_z(key: Key, identity: np.ndarray) -> np.ndarray:
  """(B, D) ArcFace identities -> (B, D) float32 dummy-identity inputs z.

  z = sqrt(D) * Q u with u = identity / |identity| and Q the key's rotation: the
  radius of N(0, I) samples, inner products between identities kept (same
  person -> same z), unrelated across keys.
  """
  identity = np.asarray(identity, np.float64)
  dim = identity.shape[-1]
  u = identity / np.maximum(np.linalg.norm(identity, axis=-1, keepdims=True), 1e-12)
  return (np.sqrt(dim) * u @ orthogonal(key, dim).T).astype(np.float32)


def random_z(key: Key, context: bytes, dim: int = 512) -> np.ndarray:
  """(dim,) float32 N(0, I) dummy-identity input of one face: the official fresh z,
  drawn from the key and `context` (image digest and face index) so runs repeat."""
  return gaussian(key.subkey("identity"), b"g2face/random-z/" + context, (dim,))


def decoder_noise(key: Key, context: bytes,
                  shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
  """Per-layer decoder noise arrays of `shapes` from the noise sub-key and `context`."""
  subkey = key.subkey("noise")
  return [gaussian(subkey, b"g2face/noise/%d/" % i + context, s) for i, s in enumerate(shapes)]
