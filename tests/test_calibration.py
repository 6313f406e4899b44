"""`g2face calibrate`: the channel profile, the replay of measured errors, verify's threshold
(NumPy-level, against direct counts), and the command on a tiny random bundle: the table
printed, the manifest updated, anonymize and verify taking their settings from it."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest

from g2face_jax import bundle, calibration, cli, photo
from g2face_jax.privacy import code_fit, keys
from g2face_jax.privacy import secure_payload as sp

KEY = keys.Key(bytes(range(32)))


def test_profile_counts_errors_per_position_and_confidence():
  rng = np.random.default_rng(0)
  signed = rng.standard_normal((3, 512, 32)) + 1.0
  signed[:, :, 5] = 2.0
  signed[:, :7, 5] = -0.1  # wrong and unsure
  signed[:, 0, 6] = 0.0    # a tie counts half
  found = calibration.profile(signed)
  expected = np.mean(signed < 0, axis=(0, 1)) + 0.5 * np.mean(signed == 0, axis=(0, 1))
  np.testing.assert_allclose(found["ber"], expected, atol=1e-5)
  assert found["ber"][5] == pytest.approx(7 / 512, abs=1e-5)
  assert found["ber_confident"][5] == 0 and found["ber_unsure"][5] > 0
  magnitude = np.abs(signed).mean(axis=(0, 1))
  np.testing.assert_allclose(found["mean_abs_logit"], magnitude, rtol=1e-4)
  per_face = np.mean(signed < 0, axis=(1, 2)) + 0.5 * np.mean(signed == 0, axis=(1, 2))
  assert found["face_ber"]["max"] == pytest.approx(per_face.max(), abs=1e-5)
  assert len(found["value_group_ber"]) == calibration.VALUE_GROUPS


def test_verify_threshold_rates_match_direct_counts():
  rng = np.random.default_rng(1)
  identities = rng.standard_normal((12, 512))
  references = identities + 0.9 * rng.standard_normal((12, 512))  # same people, noisy
  found = calibration.verify_threshold(identities, references, identities)
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
  genuine = np.sum(unit(identities) * unit(references), axis=1)
  cos = unit(identities) @ unit(identities).T
  impostor = cos[~np.eye(12, dtype=bool)]
  t = found["threshold"]
  assert found["false_accept"] == pytest.approx(np.mean(impostor >= t), abs=1e-4)
  assert found["false_reject"] == pytest.approx(np.mean(genuine < t), abs=1e-4)
  assert found["false_accept"] + found["false_reject"] == 0  # separable here
  assert (found["genuine_pairs"], found["impostor_pairs"]) == (12, 132)


def test_replay_counts_faces_whose_measured_errors_the_layout_survives():
  rng = np.random.default_rng(2)
  identities = rng.standard_normal((3, 512))
  signed = np.abs(rng.standard_normal((3, 512, 32))) + 0.5
  signed[0, :, 20:] *= -1  # face 0: a third of its positions read wrong
  assert calibration.replay(KEY, "fit-ffff8000-vffff-n8-q8", signed, identities) == 3  # not its positions
  assert calibration.replay(KEY, "fit-ffffffff-vffff-n8-q8", signed, identities) == 2


def test_fit_prefers_fidelity_then_margin():
  rng = np.random.default_rng(3)
  bits = rng.random((4, 512, 32)) < 0.5
  clean = code_fit.signed_logits(bits, (2 * bits - 1) * 4.0 + rng.standard_normal(bits.shape))
  fit = code_fit.fit({"png": clean})
  assert fit.meets_target and fit.best.value_bits == 8
  assert fit.as_dict()["layout"] == fit.best.layout


@pytest.fixture(scope="module")
def calibrated(bundle_dir, tmp_path_factory):
  """A copy of the tiny random bundle, calibrated by the command on 2 demo faces."""
  path = str(tmp_path_factory.mktemp("calibrated") / "bundle")
  shutil.copytree(bundle_dir, path)
  return path


def test_calibrate_command_prints_the_table_and_stores_the_profile(calibrated, capsys):
  assert cli.main(["calibrate", "--bundle", calibrated, "--limit", "2", "--jpeg", "80",
                   "--compile-cache", ""]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[0] == "calibration on 2 faces from the demo faces (scikit-image LFW crops)"
  assert lines[1].split()[:4] == ["pos", "kind", "BER", "png"] and "jpeg80" in lines[1]
  assert [line.split()[0] for line in lines[2:34]] == [str(p) for p in range(32)]
  assert "verify threshold" in out and "stored in" in out
  manifest = bundle.read_manifest(calibrated)
  found = manifest["calibration"]
  assert found["format"] == calibration.FORMAT and found["faces"] == 2
  assert set(found["conditions"]) == {"png", "jpeg80"}
  for condition in found["conditions"].values():
    assert len(condition["ber"]) == 32 and all(0 <= b <= 1 for b in condition["ber"])
    assert 0.3 < np.mean(condition["ber"]) < 0.7  # random weights: about chance
  layout = calibration.layout_of(manifest)
  assert sp.layout(layout).version == sp.FITTED_VERSION
  assert not found["fit"]["meets_target"] and "does NOT meet" in out
  assert f"layout {layout}:" in out
  # the bundle still loads, with its networks
  assert set(bundle.load(calibrated).variables) == set(bundle.load(calibrated).manifest["networks"])
  # anonymize takes the calibrated layout unless told otherwise; verify its threshold
  assert cli._layout(argparse.Namespace(layout=None, bundle=calibrated)) == layout
  assert cli._layout(argparse.Namespace(layout="uniform", bundle=calibrated)) == "uniform"
  threshold = found["verify"]["threshold"]
  assert cli._verify_threshold(None, manifest) == (threshold, "calibrated")
  assert cli._verify_threshold(0.5, manifest) == (0.5, "given")
  with open(os.path.join(calibrated, bundle.MANIFEST)) as f:
    assert json.load(f)["calibration"]["verify"]["threshold"] == threshold


def test_uncalibrated_bundle_keeps_the_defaults(bundle_dir):
  manifest = bundle.read_manifest(bundle_dir)
  assert calibration.of(manifest) is None
  assert cli._layout(argparse.Namespace(layout=None, bundle=bundle_dir)) == "float"
  assert cli._verify_threshold(None, manifest) == (photo.VERIFY_THRESHOLD, "default")


def test_calibrate_refuses_too_few_faces(tmp_path, bundle_dir, capsys):
  folder = tmp_path / "faces"
  folder.mkdir()
  photo.write(str(folder / "one.png"), np.zeros((16, 16, 3), np.uint8))
  assert cli.main(["calibrate", "--bundle", bundle_dir, "--data", str(folder),
                   "--compile-cache", ""]) == 2
  assert "at least 2 faces" in capsys.readouterr().err


def test_recover_without_stamp_tries_the_tools_layout_then_the_fixed_ones(bundle_dir):
  """A photo whose stamp is gone: the calibrated layout (the tool's) is tried, then the fixed
  layouts, so payloads of either kind still decode."""
  fitted = "fit-ffffffff-vffff-n16-q6"
  tool = photo.Anonymizer(bundle_dir, KEY, layout=fitted)
  identity = np.random.default_rng(4).standard_normal(512)
  for name in (fitted, "float"):
    bits = sp.encode(KEY, identity, b"face", name)
    found, _ = tool.read_payload(sp.bits_as_logits(bits) * 4, "secure", None, "face 0")
    cos = found @ identity / np.linalg.norm(found) / np.linalg.norm(identity)
    assert cos > 0.99
  plain = photo.Anonymizer(bundle_dir, KEY)  # an uncalibrated tool does not know the layout
  with pytest.raises(photo.FileError, match="no g2face payload"):
    plain.read_payload(sp.bits_as_logits(sp.encode(KEY, identity, b"face", fitted)), "secure",
                       None, "face 0")


def test_calibrate_refusals_are_one_line_naming_the_culprit(tmp_path, bundle_dir, capsys):
  missing = str(tmp_path / "none")
  assert cli.main(["calibrate", "--bundle", missing]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("g2face calibrate: error: ") and missing in err and "\n" not in err
  blank = str(tmp_path / "blank.png")
  photo.write(blank, np.full((48, 48, 3), 128, np.uint8))
  assert cli.main(["calibrate", "--bundle", bundle_dir, "--limit", "2", "--photo", blank,
                   "--compile-cache", ""]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"g2face calibrate: error: {blank}: no face found"
