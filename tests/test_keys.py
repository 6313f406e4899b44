"""Key files, sub-keys and the key-driven draws (virtual identities, noise)."""
import json
import os
import stat

import numpy as np
import pytest
from scipy import stats

from g2face_jax.privacy import keys

FAST_N = 2 ** 12  # scrypt cost for tests (the default is 2^17)


def test_key_file_round_trip_mode_0600_never_overwritten(tmp_path):
  path = str(tmp_path / "k.key")
  key = keys.write_key_file(path)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert keys.load(path) == key
  with pytest.raises(keys.KeyFileError, match="already exists"):
    keys.write_key_file(path)
  assert keys.load(path) == key


def test_generated_keys_differ_and_repr_hides_material():
  a, b = keys.generate(), keys.generate()
  assert a != b and len(a.material) == 32
  assert a.material.hex() not in repr(a) and "hidden" in repr(a)


def test_passphrase_key_file(tmp_path):
  path = str(tmp_path / "p.key")
  key = keys.write_key_file(path, passphrase="correct horse", scrypt_n=FAST_N)
  text = open(path).read()
  assert key.material.hex() not in text and "correct horse" not in text
  assert json.loads(text)["kind"] == "scrypt"
  assert keys.load(path, passphrase="correct horse") == key
  assert keys.load(path, env={keys.PASSPHRASE_ENV: "correct horse"}) == key
  with pytest.raises(keys.KeyFileError, match="wrong passphrase"):
    keys.load(path, passphrase="wrong horse")
  # same passphrase, new file -> new salt -> a different key
  other = keys.write_key_file(str(tmp_path / "q.key"), passphrase="correct horse",
                              scrypt_n=FAST_N)
  assert other != key


def test_passphrase_file_without_passphrase_is_a_clear_error(tmp_path, monkeypatch):
  path = str(tmp_path / "p.key")
  keys.write_key_file(path, passphrase="pw", scrypt_n=FAST_N)
  monkeypatch.setattr("sys.stdin", None)
  with pytest.raises(keys.KeyFileError, match="no passphrase"):
    keys.load(path, env={})


def test_scrypt_matches_hashlib_reference():
  salt = bytes(range(16))
  ours = keys.from_passphrase("pw", salt, n=FAST_N, r=8, p=1)
  import hashlib
  ref = hashlib.scrypt(b"pw", salt=salt, n=FAST_N, r=8, p=1, dklen=32)
  assert ours.material == ref


def test_key_from_environment():
  key = keys.generate()
  assert keys.load(env={keys.KEY_ENV: key.material.hex()}) == key
  with pytest.raises(keys.KeyFileError, match=keys.KEY_ENV):
    keys.load(env={})
  with pytest.raises(keys.KeyFileError, match="hex"):
    keys.load(env={keys.KEY_ENV: "zz"})


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00", b"{}", b'{"format": "g2face-key"}',
                                     b'{"format": "g2face-key", "version": 1, "kind": "raw", '
                                     b'"key": "abcd"}', b"not json"])
def test_bad_key_files_name_the_file(tmp_path, content):
  path = tmp_path / "bad.key"
  path.write_bytes(content)
  with pytest.raises(keys.KeyFileError, match="bad.key"):
    keys.load(str(path))


def test_missing_key_file(tmp_path):
  with pytest.raises(keys.KeyFileError, match="cannot read"):
    keys.load(str(tmp_path / "none.key"))


def test_subkeys_match_rfc5869_hkdf_and_are_separate():
  key = keys.Key(bytes(range(32)))
  subs = {p: key.subkey(p) for p in keys.PURPOSES}
  assert len(set(subs.values())) == len(keys.PURPOSES)
  assert all(len(s) == 32 for s in subs.values())
  # HKDF-SHA256 with no salt, by the RFC 5869 definition with hmac
  import hashlib
  import hmac
  prk = hmac.new(bytes(32), key.material, hashlib.sha256).digest()
  okm = hmac.new(prk, b"g2face/v1/payload" + b"\x01", hashlib.sha256).digest()
  assert subs["payload"] == okm
  assert keys.Key(bytes(31) + b"\x01").subkey("payload") != subs["payload"]
  with pytest.raises(ValueError, match="unknown key purpose"):
    key.subkey("other")


def test_gaussian_is_deterministic_standard_normal_and_context_separated():
  sub = keys.generate().subkey("noise")
  a = keys.gaussian(sub, b"ctx", (200, 100))
  np.testing.assert_array_equal(a, keys.gaussian(sub, b"ctx", (200, 100)))
  assert a.dtype == np.float32
  assert stats.kstest(a.ravel(), "norm").pvalue > 1e-3
  b = keys.gaussian(sub, b"ctx2", (200, 100))
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02


def test_orthogonal_is_orthogonal_and_key_dependent():
  k1, k2 = keys.generate(), keys.generate()
  q1 = keys.orthogonal(k1)
  np.testing.assert_allclose(q1 @ q1.T, np.eye(512), atol=1e-10)
  np.testing.assert_array_equal(q1, keys.orthogonal(keys.Key(k1.material)))
  assert np.abs(q1 - keys.orthogonal(k2)).max() > 0.1


def _identities(n, seed=0):
  return np.random.default_rng(seed).standard_normal((n, 512)).astype(np.float32) * 3


def test_consistent_z_preserves_norm_and_inner_products():
  key = keys.generate()
  ids = _identities(6)
  z = keys.consistent_z(key, ids)
  np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.sqrt(512), rtol=1e-5)
  u = ids / np.linalg.norm(ids, axis=1, keepdims=True)
  np.testing.assert_allclose(z @ z.T / 512, u @ u.T, atol=1e-5)
  # the same person (a scaled embedding) -> the same z
  np.testing.assert_allclose(keys.consistent_z(key, ids * 2.5), z, atol=1e-5)
  np.testing.assert_array_equal(keys.consistent_z(keys.Key(key.material), ids), z)


def test_consistent_z_unrelated_across_keys():
  ids = _identities(32, seed=1)
  z1 = keys.consistent_z(keys.generate(), ids)
  z2 = keys.consistent_z(keys.generate(), ids)
  cos = np.sum(z1 * z2, axis=1) / 512
  # cosines of unrelated 512-d directions: N(0, 1/512), sd 0.044
  assert np.abs(cos).max() < 0.25 and abs(cos.mean()) < 0.05


def test_random_z_and_noise_are_reproducible_and_separated():
  key = keys.generate()
  z = keys.random_z(key, b"image-a/0")
  np.testing.assert_array_equal(z, keys.random_z(keys.Key(key.material), b"image-a/0"))
  assert z.shape == (512,) and abs(np.linalg.norm(z) - np.sqrt(512)) < 4
  assert np.abs(z - keys.random_z(key, b"image-a/1")).max() > 0.5
  assert np.abs(z - keys.random_z(keys.generate(), b"image-a/0")).max() > 0.5
  shapes = [(1, 4, 4, 1), (1, 8, 8, 1), (1, 8, 8, 1)]
  noise = keys.decoder_noise(key, b"image-a/0", shapes)
  assert [n.shape for n in noise] == shapes
  again = keys.decoder_noise(key, b"image-a/0", shapes)
  for a, b in zip(noise, again):
    np.testing.assert_array_equal(a, b)
  assert np.abs(noise[1] - noise[2]).max() > 0.5  # layers draw apart
  other = keys.decoder_noise(key, b"image-b/0", shapes)
  assert np.abs(noise[1] - other[1]).max() > 0.5
