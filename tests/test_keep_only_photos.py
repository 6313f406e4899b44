"""--keep / --only on photos: faces matching a reference photo's person (ArcFace cosine >=
--match-threshold) are left byte-identical (method 'kept' in the stamp and the --json
summary) and skipped by recover; the others are anonymized, or obscured when too small.
Tiny random-weight bundle and the bundled two-face photo (left and right person)."""
import json
import os

import cv2
import numpy as np
import pytest

from g2face_jax import faces, files, images, photo
from g2face_jax.privacy import keys

from test_anonymizer import GROUP, PerfectExtractor, _outside, _run, group, tool  # noqa: F401
from test_video import references  # noqa: F401  (the group photo's two people, one photo each)


def _face_mask(quad, shape):
  mask = np.zeros(shape[:2], np.uint8)
  cv2.fillPoly(mask, [np.round(np.asarray(quad)).astype(np.int32)], 1)
  return mask.astype(bool)


def _check_one_kept(out, original, stamp, kept: int):
  """Every pixel away from the anonymized face (the kept face's whole square included) is
  the input's; the anonymized face changed."""
  other = 1 - kept
  anonymized_only = photo.Stamp("secure", None, 32, False, (stamp.quads[other],))
  outside = _outside(anonymized_only, original.shape)
  assert np.all(outside[_face_mask(stamp.quads[kept], original.shape)])
  np.testing.assert_array_equal(out[outside], original[outside])
  inside = _face_mask(stamp.quads[other], original.shape)
  assert np.mean(np.any(out[inside] != original[inside], axis=-1)) > 0.5


@pytest.mark.parametrize("flag, kept", [("--keep", 1), ("--only", 0)])
def test_keep_and_only_from_the_command_line(capsys, tmp_path, bundle_dir, key_file, group,
                                             references, flag, kept):
  """--keep right: the right face byte-identical, the left anonymized; --only right: the
  reverse. The summary and the stamp say 'kept'; recovery leaves the kept face alone."""
  code, out, err = _run(capsys, "anonymize", GROUP, flag, references[1], "--bundle",
                        bundle_dir, "--key", key_file, "--out", str(tmp_path / "a"), "--json")
  assert code == 0, err
  record = json.loads(out)["files"][0]
  methods = ["kept" if i == kept else "g2face" for i in range(2)]
  assert [f["method"] for f in record["per_face"]] == methods
  cosines = [f["reference_cosine"] for f in record["per_face"]]
  assert cosines[1] >= 0.3 > cosines[0]  # the right person matches its own photo only
  assert record["faces"] == 2 and record["kept"] == 1 and "1 face(s) kept" in record["note"]
  path = str(tmp_path / "a" / "group_photo.png")
  stamp = photo.read_stamp(path)
  assert list(stamp.methods) == methods and stamp.kept == (kept,) and stamp.obscured == ()
  np.testing.assert_allclose(np.asarray(stamp.quads), [f.quad for f in faces.detect(group)],
                             atol=1e-9)
  _check_one_kept(images.read(path), group, stamp, kept)


def test_recover_restores_only_the_anonymized_face(monkeypatch, tmp_path, bundle_dir, key_file,
                                                   group, references):
  perfect = PerfectExtractor(monkeypatch)
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file))
  keep = tool.reference_identities(references[1:])
  anon, stamp, records = tool.anonymize_photo(group, keep=keep)
  assert len(perfect.hidden) == 1  # only the left face went through the generator
  assert [r["method"] for r in records] == ["g2face", "kept"]
  _check_one_kept(anon, group, stamp, kept=1)
  path = str(tmp_path / "anon.png")
  photo.write(path, anon, stamp)
  assert photo.read_stamp(path) == stamp
  result = files.recover_file(tool, path, str(tmp_path / "rec.png"))
  assert result.ok and result.faces == 1 and result.kept == 1 and result.obscured is None
  assert result.note == "1 kept face(s) left as they are"
  recovered = images.read(str(tmp_path / "rec.png"))
  left = _outside(photo.Stamp("secure", None, 32, False, (stamp.quads[0],)), group.shape)
  np.testing.assert_array_equal(recovered[left], group[left])  # the kept face untouched
  assert np.any(recovered[~left] != anon[~left])  # the anonymized face decoded again
  assert len(tool.hidden_identities(anon, stamp)) == 1  # verify reads the left face only


def test_identities_in_one_batch_and_small_faces(monkeypatch, bundle_dir, key_file, group,
                                                 references):
  """The faces' identities are computed in one batch; a kept small face is left as it is,
  a small face that is not kept gets the small-face method."""
  mixed = cv2.resize(group, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
  found = faces.detect(mixed)
  assert len(found) == 2 and found[0].side < found[1].side  # left: small, right: large
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file),
                          min_face=(found[0].side + found[1].side) / 2, small_faces="fill")
  left, right = tool.reference_identities(references)
  calls = []
  real = tool.identities
  monkeypatch.setattr(tool, "identities", lambda x: calls.append(len(x)) or real(x))
  cases = [(dict(keep=(left,)), ["kept", "g2face"]), (dict(keep=(right,)), ["fill", "kept"]),
           (dict(only=(left,)), ["fill", "kept"]), (dict(only=(right,)), ["kept", "g2face"])]
  for refs, methods in cases:
    calls.clear()
    anon, stamp, records = tool.anonymize_photo(mixed, **refs)
    assert calls == [2]
    assert [r["method"] for r in records] == methods, refs
    assert stamp.kept == (methods.index("kept"),)
    assert stamp.obscured == ((0,) if "fill" in methods else ())
    kept = _face_mask(stamp.quads[methods.index("kept")], mixed.shape)
    np.testing.assert_array_equal(anon[kept], mixed[kept])
  calls.clear()
  _, stamp, records = tool.anonymize_photo(mixed)  # no references: no identities needed
  assert calls == [] and stamp.kept == () and "reference_cosine" not in records[0]


def test_refusals(capsys, tmp_path, bundle_dir, key_file, references, tool, group):
  code, out, err = _run(capsys, "anonymize", GROUP, "--keep", references[0], "--aligned",
                        "--bundle", bundle_dir, "--key", key_file, "--out", str(tmp_path / "a"))
  assert code == 2 and "--keep / --only need detected faces" in err and err.count("\n") == 1
  blank = str(tmp_path / "blank.png")
  images.write_png(blank, np.full((64, 64, 3), 128, np.uint8))
  code, out, err = _run(capsys, "anonymize", GROUP, "--only", blank, "--bundle", bundle_dir,
                        "--key", key_file, "--out", str(tmp_path / "b"))
  assert code != 0 and f"reference {blank}: no face found" in err and err.count("\n") == 1
  with pytest.raises(ValueError, match="not both"):
    tool.anonymize_photo(group, keep=(np.ones(512),), only=(np.ones(512),))
  with pytest.raises(photo.FileError, match="--aligned"):
    tool.anonymize_photo(group[:, :320], aligned=True, keep=(np.ones(512),))
  assert not os.path.exists(tmp_path / "b" / "group_photo.png")


def test_kept_stamps_round_trip():
  quad = [[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
  stamp = photo.Stamp("secure", "float", 32, False, (quad, quad, quad),
                      ("g2face", "kept", "pixelate"))
  assert photo.Stamp.from_json(stamp.to_json()) == stamp
  assert stamp.kept == (1,) and stamp.obscured == (2,)
