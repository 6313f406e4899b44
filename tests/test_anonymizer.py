"""Photo-level anonymize / recover / verify (`photo`; files through `files`) and the
`g2face` photo commands, on a bundle of random weights (tiny config, 32x32 crops) and
the bundled two-face photo.

Random weights produce a face-shaped grey patch and cannot extract their own
payload; recovery and verification are therefore checked twice: as they are
(they must fail with a clear error), and with the extractor replaced by a
perfect one that returns the hidden bits (the rest of the road back is real).
"""
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from g2face_jax import bundle, cli, detection, faces, files, images, models, payload, photo, pipeline
from g2face_jax.privacy import keys, secure_payload

from conftest import random_variables

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GROUP = os.path.join(DATA, "group_photo.jpg")


@pytest.fixture(scope="module")
def no_extractor_bundle(tmp_path_factory, tiny_config):
  path = str(tmp_path_factory.mktemp("bundle") / "no-extractor")
  names = [n for n in models.INFERENCE_NETWORKS if n != "extractor"]
  bundle.save(path, tiny_config, random_variables(tiny_config.model, names))
  return path


@pytest.fixture(scope="module")
def other_key_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("keys") / "b.key")
  keys.write_key_file(path)
  return path


@pytest.fixture(scope="module")
def group():
  return images.read(GROUP)


@pytest.fixture(scope="module")
def tool(bundle_dir, key_file):
  return photo.Anonymizer(bundle_dir, keys.load(key_file))


def _outside(stamp, shape, grow=2):
  inside = np.zeros(shape[:2], np.uint8)
  for quad in stamp.quads:
    cv2.fillPoly(inside, [np.round(np.asarray(quad)).astype(np.int32)], 1)
  return cv2.dilate(inside, np.ones((2 * grow + 1,) * 2, np.uint8)) == 0


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  return code, out, err


def test_commands_keep_compiled_programs_in_the_compile_cache(tmp_path, bundle_dir, key_file):
  """A second run loads what the first compiled from --compile-cache and writes the
  same bytes (fresh processes: JAX reads its cache folder once per process)."""
  cache = tmp_path / "xla"
  outputs = []
  for run in ("first", "second"):
    done = subprocess.run(
        [sys.executable, "-m", "g2face_jax.cli", "anonymize", GROUP, "--bundle", bundle_dir,
         "--key", key_file, "--out", str(tmp_path / run), "--compile-cache", str(cache)],
        capture_output=True, text=True,
        env=dict(os.environ, JAX_DEBUG_LOG_MODULES="jax._src.compiler",  # logs cache hits
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))  # the tiny programs too
    assert done.returncode == 0, done.stderr[-2000:]
    outputs.append(open(tmp_path / run / "group_photo.png", "rb").read())
    hits = done.stderr.count("Persistent compilation cache hit")
    if run == "first":
      entries = sorted(os.listdir(cache))
      assert entries and hits == 0
  assert hits >= len(entries) and sorted(os.listdir(cache)) == entries
  assert outputs[0] == outputs[1]


def _with_exif(src, dst):
  exif = Image.Exif()
  exif[0x010E] = "secret description"  # ImageDescription
  exif[0x0112] = 1
  with Image.open(src) as im:
    im.save(dst, exif=exif, quality=95)


def test_anonymize_command_deterministic_background_kept_metadata_dropped(
    capsys, tmp_path, bundle_dir, key_file, other_key_file):
  src = str(tmp_path / "in.jpg")
  _with_exif(GROUP, src)
  assert b"secret description" in open(src, "rb").read()
  runs = {}
  for name, key in [("a", key_file), ("a2", key_file), ("b", other_key_file)]:
    code, out, _ = _run(capsys, "anonymize", src, "--bundle", bundle_dir, "--key", key,
                        "--out", str(tmp_path / name), "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["ok"] == 1 and summary["failed"] == 0 and summary["files"][0]["faces"] == 2
    runs[name] = open(tmp_path / name / "in.png", "rb").read()
  assert runs["a"] == runs["a2"]  # same key + same input -> byte-identical
  assert runs["a"] != runs["b"]
  assert b"secret description" not in runs["a"]
  with Image.open(tmp_path / "a" / "in.png") as im:
    assert im.format == "PNG" and set(im.info) == {photo.STAMP_KEY}
    assert len(im.getexif()) == 0
    out_pixels = np.asarray(im.convert("RGB"))
  stamp = photo.read_stamp(str(tmp_path / "a" / "in.png"))
  assert (stamp.codec, stamp.layout, stamp.size, stamp.aligned) == ("secure", "float", 32, False)
  original = images.read(src)
  detected = faces.detect(original)
  np.testing.assert_allclose(np.asarray(stamp.quads), [f.quad for f in detected], atol=1e-9)
  outside = _outside(stamp, original.shape)
  np.testing.assert_array_equal(out_pixels[outside], original[outside])
  assert np.mean(np.any(out_pixels[~outside] != original[~outside], axis=-1)) > 0.5
  assert b"secret" not in json.dumps(stamp.to_json()).encode()


def test_random_weights_cannot_read_their_payload(capsys, tmp_path, bundle_dir, key_file,
                                                  tool, group):
  """What random weights cannot do: the extractor does not find the hidden bits."""
  anon, stamp = tool.anonymize_image(group)
  path = str(tmp_path / "anon.png")
  photo.write(path, anon, stamp)
  code, out, err = _run(capsys, "recover", path, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(tmp_path / "rec"))
  assert code == 1
  assert f"{path}: face 0: no g2face payload found" in out
  assert not os.listdir(tmp_path / "rec")
  code, out, err = _run(capsys, "verify", path, "--reference", GROUP, "--bundle", bundle_dir,
                        "--key", key_file)
  assert code == 1 and "no g2face payload" in err and err.count("\n") == 1


class PerfectExtractor:
  """Stands in for a trained extractor: records the bits `pipeline.anonymize` hides, one
  (512, 32) row per face, and returns them as confident logits, face by face in the same
  order (cycling)."""

  def __init__(self, monkeypatch):
    self.hidden, self.calls = [], 0
    real_anonymize = pipeline.anonymize

    def anonymize(nets, variables, x, coeff, z, hide_bits, noise, **static):
      self.hidden.extend(np.asarray(hide_bits))
      return real_anonymize(nets, variables, x, coeff, z, hide_bits, noise, **static)

    def extract_identity(nets, variables, anon, **static):
      rows = range(self.calls, self.calls + anon.shape[0])
      bits = np.stack([self.hidden[k % len(self.hidden)] for k in rows])
      self.calls += anon.shape[0]
      return dict(logits=(bits * 2 - 1) * 8.0, bits=bits,
                  extracted_id=payload.decode_identity(bits))

    monkeypatch.setattr(pipeline, "anonymize", anonymize)
    monkeypatch.setattr(pipeline, "extract_identity", extract_identity)


@pytest.mark.parametrize("codec", photo.CODECS)
def test_recover_and_verify_with_a_perfect_extractor(monkeypatch, tmp_path, bundle_dir, key_file,
                                                     group, codec):
  perfect = PerfectExtractor(monkeypatch)
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file), codec=codec)
  anon, stamp = tool.anonymize_image(group)
  assert len(perfect.hidden) == 2
  path = str(tmp_path / "anon.png")
  photo.write(path, anon, stamp)
  result = files.recover_file(tool, path, str(tmp_path / "rec.png"))
  assert result.ok and result.faces == 2
  recovered = images.read(str(tmp_path / "rec.png"))
  outside = _outside(stamp, group.shape)
  np.testing.assert_array_equal(recovered[outside], group[outside])
  assert np.any(recovered[~outside] != anon[~outside])  # the faces were decoded again
  # verify: Grace Hopper is the reference photo's largest face, hidden in face 1
  verdict = files.verify_file(tool, path, GROUP)
  assert verdict.faces == 2 and verdict.cosines[1] > 0.999 and verdict.match[1]
  if codec == "secure":
    wrong = photo.Anonymizer(bundle_dir, keys.generate(), codec=codec)
    with pytest.raises(photo.FileError, match="face 0: wrong key"):
      files.recover_file(wrong, path, str(tmp_path / "wrong.png"))
    assert not os.path.exists(tmp_path / "wrong.png")


def test_bad_inputs_fail_one_line_each_and_the_rest_goes_on(capsys, tmp_path, bundle_dir,
                                                            key_file, group):
  folder = tmp_path / "in"
  (folder / "sub").mkdir(parents=True)
  shutil.copy(GROUP, folder / "good.jpg")
  (folder / "sub" / "notes.jpg").write_text("not a picture")
  data = open(GROUP, "rb").read()
  (folder / "sub" / "cut.jpg").write_bytes(data[:len(data) // 2])
  Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(folder / "plain.png")
  small = cv2.resize(group[:, 320:], None, fx=0.2, fy=0.2, interpolation=cv2.INTER_AREA)
  Image.fromarray(small).save(folder / "sub" / "small.png")
  (folder / "readme.txt").write_text("skipped: not an image suffix")
  out_dir = tmp_path / "out"
  code, out, err = _run(capsys, "anonymize", str(folder), "--bundle", bundle_dir,
                        "--key", key_file, "--out", str(out_dir), "--json")
  assert code == 1
  summary = json.loads(out)
  assert summary["ok"] == 2 and summary["failed"] == 3
  errors = {os.path.basename(r["input"]): r["error"] for r in summary["files"] if "error" in r}
  assert "not an image" in errors["notes.jpg"]
  assert "unreadable or truncated" in errors["cut.jpg"]
  assert "no face found" in errors["plain.png"]
  for name, line in errors.items():
    assert name in line and "\n" not in line and f"FAILED  {line}" in err
  # a face too small for the generator (58 px < 64) is obscured; the file does not fail
  small_result = [r for r in summary["files"] if r["input"].endswith("small.png")][0]
  assert [f["method"] for f in small_result["per_face"]] == [photo.DEFAULT_SMALL_FACES]
  assert small_result["per_face"][0]["side"] < faces.MIN_FACE
  assert small_result["obscured"] == 1 and "obscured" in small_result["note"]
  written = sorted(os.path.relpath(os.path.join(r, f), out_dir)
                   for r, _, fs in os.walk(out_dir) for f in fs)
  assert written == ["good.png", os.path.join("sub", "small.png")]  # no temporary files


def test_fatal_problems_are_one_line_errors(capsys, tmp_path, bundle_dir, no_extractor_bundle,
                                            key_file, monkeypatch):
  monkeypatch.delenv(keys.KEY_ENV, raising=False)
  blocker = tmp_path / "file"
  blocker.write_text("x")
  cases = [
      (["recover", GROUP, "--bundle", no_extractor_bundle, "--key", key_file, "--out",
        str(tmp_path / "o")], "bundle has no extractor"),
      (["anonymize", GROUP, "--bundle", bundle_dir, "--key", key_file, "--out",
        str(blocker / "sub")], "output folder not writable"),
      (["anonymize", GROUP, "--bundle", bundle_dir, "--out", str(tmp_path / "o")], "no key"),
      (["anonymize", GROUP, "--bundle", str(tmp_path / "none"), "--key", key_file, "--out",
        str(tmp_path / "o")], "bundle folder not found"),
      (["anonymize", GROUP, "--bundle", bundle_dir, "--key", str(blocker), "--out",
        str(tmp_path / "o")], "not a valid g2face key file"),
  ]
  for argv, message in cases:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_key_from_environment_and_aligned_crops(capsys, tmp_path, bundle_dir, group, monkeypatch):
  key = keys.generate()
  monkeypatch.setenv(keys.KEY_ENV, key.material.hex())
  crop = images.to_uint8(faces.align(group, faces.detect(group)[0].quad, 64))
  Image.fromarray(crop).save(tmp_path / "crop.png")
  outputs = {}
  for mode in ("consistent", "random"):
    code, out, err = _run(capsys, "anonymize", str(tmp_path / "crop.png"), "--aligned",
                          "--identity", mode, "--bundle", bundle_dir, "--out", str(tmp_path / mode))
    assert code == 0, err
    outputs[mode] = np.asarray(Image.open(tmp_path / mode / "crop.png"))
    assert key.material.hex() not in out + err
  assert outputs["consistent"].shape == (32, 32, 3)
  assert np.any(outputs["consistent"] != outputs["random"])
  stamp = photo.read_stamp(str(tmp_path / "random" / "crop.png"))
  assert stamp.aligned and stamp.quads == ()
  Image.fromarray(crop[:, :40]).save(tmp_path / "oblong.png")
  code, out, err = _run(capsys, "anonymize", str(tmp_path / "oblong.png"), "--aligned",
                        "--bundle", bundle_dir, "--out", str(tmp_path / "x"))
  assert code == 1 and "must be square" in out


def test_keygen_command(capsys, tmp_path, monkeypatch):
  path = str(tmp_path / "new.key")
  code, out, _ = _run(capsys, "keygen", "--out", path)
  assert code == 0 and oct(os.stat(path).st_mode & 0o777) == "0o600"
  material = keys.load(path).material.hex()
  assert material not in out
  code, _, err = _run(capsys, "keygen", "--out", path)
  assert code == 2 and "already exists" in err
  monkeypatch.setenv(keys.PASSPHRASE_ENV, "a passphrase")
  code, _, _ = _run(capsys, "keygen", "--out", str(tmp_path / "p.key"), "--passphrase")
  assert code == 0 and json.load(open(tmp_path / "p.key"))["kind"] == "scrypt"


def test_stamp_round_trip_and_unknown_stamp():
  stamp = photo.Stamp("secure", "float", 32, False, ([[0, 0], [0, 1], [1, 1], [1, 0]],))
  assert photo.Stamp.from_json(stamp.to_json()) == photo.Stamp(
      "secure", "float", 32, False, ([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]],))
  with pytest.raises(ValueError, match="stamp format"):
    photo.Stamp.from_json('{"format": "other"}')
  assert secure_payload.DEFAULT_LAYOUT == "float"


def test_photo_without_stamp_or_payload_is_redetected_and_reported(capsys, tmp_path, bundle_dir,
                                                                   key_file):
  """No stamp: recovery re-detects the faces; a photo never anonymized has no payload."""
  code, out, _ = _run(capsys, "recover", GROUP, "--bundle", bundle_dir, "--key", key_file,
                      "--out", str(tmp_path / "rec"))
  assert code == 1 and f"{GROUP}: face 0: no g2face payload found" in out


@pytest.fixture(scope="module")
def mixed(group):
  """The group photo at 0.4: faces of about 69 and 115 px (alignment square sides)."""
  return cv2.resize(group, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("method", ["pixelate", "fill", "blur"])
def test_small_faces_are_obscured_the_rest_anonymized_and_recovered(monkeypatch, tmp_path,
                                                                    bundle_dir, key_file,
                                                                    mixed, method):
  from g2face_jax import obscure
  perfect = PerfectExtractor(monkeypatch)
  found = faces.detect(mixed)
  assert len(found) == 2
  sides = sorted(f.side for f in found)
  min_face = (sides[0] + sides[1]) / 2
  small = int(np.argmin([f.side for f in found]))
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file), min_face=min_face, small_faces=method)
  anon, stamp, records = tool.anonymize_photo(mixed)
  assert len(perfect.hidden) == 1  # only the large face went through the generator
  assert [r["method"] for r in records] == [method if i == small else "g2face" for i in range(2)]
  np.testing.assert_allclose([r["score"] for r in records], [f.score for f in found], atol=1e-4)
  assert stamp.obscured == (small,) and stamp.method(small) == method
  # the small face: exactly its enlarged square changed, as obscure does it alone
  expected_small = obscure.apply(mixed, found[small].quad, method)
  region = obscure.region_mask(found[small].quad, mixed.shape)
  big_quad = found[1 - small].quad
  far_from_big = _outside(photo.Stamp("secure", None, 32, False, (big_quad.tolist(),)),
                          mixed.shape)
  np.testing.assert_array_equal(anon[region & far_from_big], expected_small[region & far_from_big])
  untouched = far_from_big & ~region
  np.testing.assert_array_equal(anon[untouched], mixed[untouched])
  # the stamp round-trips through the file; recovery restores the large face only
  path = str(tmp_path / "anon.png")
  photo.write(path, anon, stamp)
  assert photo.read_stamp(path) == stamp
  result = files.recover_file(tool, path, str(tmp_path / "rec.png"))
  assert result.ok and result.faces == 1 and result.obscured == 1
  assert "not recoverable" in result.note
  recovered = images.read(str(tmp_path / "rec.png"))
  np.testing.assert_array_equal(recovered[region & far_from_big], anon[region & far_from_big])
  assert np.any(recovered[~far_from_big] != anon[~far_from_big])
  # verify reads the generator's face only
  assert len(tool.hidden_identities(anon, stamp)) == 1


def test_small_faces_command_line_and_g2face_anyway(capsys, tmp_path, bundle_dir, key_file,
                                                    mixed):
  src = str(tmp_path / "mixed.png")
  images.write_png(src, mixed)
  found = faces.detect(mixed)
  for method, expected in [("g2face", ["g2face", "g2face"]), ("fill", None)]:
    code, out, err = _run(capsys, "anonymize", src, "--bundle", bundle_dir, "--key", key_file,
                          "--out", str(tmp_path / method), "--json", "--min-face", "1000",
                          "--small-faces", method)
    assert code == 0, err
    record = json.loads(out)["files"][0]
    assert [f["method"] for f in record["per_face"]] == (expected or [method, method])
    assert all(f["side"] < 1000 and isinstance(f["score"], float) for f in record["per_face"])
    stamp = photo.read_stamp(str(tmp_path / method / "mixed.png"))
    assert stamp.obscured == (() if method == "g2face" else (0, 1))
  # default: pixelate under faces.MIN_FACE; both faces of `mixed` are above it
  code, out, err = _run(capsys, "anonymize", src, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(tmp_path / "default"), "--json")
  assert code == 0 and all(f["method"] == "g2face" for f in json.loads(out)["files"][0]["per_face"])
  assert all(f.side >= faces.MIN_FACE for f in found)
  # recovering a photo whose faces were all obscured writes it unchanged and says so
  code, out, err = _run(capsys, "recover", str(tmp_path / "fill" / "mixed.png"), "--bundle",
                        bundle_dir, "--key", key_file, "--out", str(tmp_path / "rec"))
  assert code == 0 and "2 obscured face(s) skipped: not recoverable" in out
  np.testing.assert_array_equal(images.read(str(tmp_path / "rec" / "mixed.png")),
                                images.read(str(tmp_path / "fill" / "mixed.png")))
  help_text = cli.build_parser()._subparsers._group_actions[0].choices["anonymize"].format_help()
  assert cli.MIN_FACE_HELP == faces.MIN_FACE
  assert f"(default {faces.MIN_FACE})" in help_text and "--small-faces" in help_text
  assert cli.THRESHOLD_HELP == detection.THRESHOLD
  assert f"(default {detection.THRESHOLD}," in help_text
  code, out, err = _run(capsys, "anonymize", src, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(tmp_path / "t"), "--threshold", "1.5")
  assert code == 2 and "the detection threshold must be in (0, 1)" in err
  code, out, err = _run(capsys, "anonymize", src, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(tmp_path / "x"), "--min-face", "-1")
  assert code == 2 and "min_face must be >= 0" in err


def test_old_stamps_are_still_read():
  quad = [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
  old = json.dumps(dict(format="g2face-anonymized/1", codec="secure", layout="float", size=32,
                        aligned=False, faces=[quad]))
  stamp = photo.Stamp.from_json(old)
  assert stamp.quads == (quad,) and stamp.obscured == () and stamp.method(0) == "g2face"
  new = photo.Stamp("secure", "float", 32, False, (quad, quad), ("g2face", "blur"))
  assert photo.Stamp.from_json(new.to_json()) == new and new.obscured == (1,)
  with pytest.raises(ValueError, match="methods"):
    photo.Stamp.from_json(new.to_json().replace('"blur"', '"swirl"'))


def test_package_exports_the_anonymizer():
  import g2face_jax
  assert g2face_jax.Anonymizer is photo.Anonymizer
