"""`g2face eval` end to end on a bundle of random weights (tiny config) and real
face crops (scikit-image's LFW subset)."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from g2face_jax import bundle, cli, models, photo
from g2face_jax.privacy import keys
from g2face_jax.eval import report
from test_anonymizer import PerfectExtractor

from conftest import FIXTURES, random_variables

BFM_MAT = os.path.join(FIXTURES, "bfm_small", "BFM_model_front.mat")


@pytest.fixture(scope="module")
def faces_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("faces")
  for i, face in enumerate(data.lfw_subset()[:3]):
    grey = np.round(face * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).resize((64, 64)).save(folder / f"face{i}.png")
  (folder / "broken.png").write_bytes(b"not an image")
  return str(folder)


@pytest.fixture(scope="module")
def eval_bundle(tmp_path_factory, tiny_config):
  from g2face_jax.convert import bfm as convert_bfm
  path = str(tmp_path_factory.mktemp("bundle") / "random")
  bundle.save(path, tiny_config, random_variables(tiny_config.model, models.INFERENCE_NETWORKS),
              bfm=convert_bfm.load_mat(BFM_MAT))
  return path


def test_eval_command_writes_the_report(capsys, tmp_path, faces_dir, eval_bundle, key_file):
  out = tmp_path / "report"
  code = cli.main(["eval", "--data", faces_dir, "--bundle", eval_bundle, "--key", key_file,
                   "--out", str(out), "--codec", "official"])
  printed = capsys.readouterr()
  assert code == 1  # the broken file is reported, not fatal
  assert "broken.png" in printed.err
  summary = json.loads((out / "metrics.json").read_text())
  assert summary["images"] == 3 and len(summary["failures"]) == 1
  for name in ("id_cosine_anonymized", "retrieval_top1", "retrieval_top5", "dlib_still_matches",
               "pose_error_deg", "expression_error", "landmark_error_px", "psnr_db", "ssim", "mae",
               "id_cosine_recovered", "bit_error_rate_png", "bit_error_rate_jpeg75",
               "same_key_same_person_cosine", "other_key_cosine", "wrong_key_rejected"):
    assert np.isfinite(summary[name]), name
  assert 0 <= summary["bit_error_rate_float"] <= 1 and -1 <= summary["ssim"] <= 1
  assert summary["retrieval_top1"] <= summary["retrieval_top5"] == 1.0  # 3 images, top-5 is all
  assert summary["wrong_key_rejected"] == 0.0  # the official code has no secret
  assert "| Recovery PSNR (dB) |" in (out / "report.md").read_text()
  assert "Recovery PSNR" in printed.out
  grid = np.array(Image.open(out / "grid.png"))
  assert grid.shape == (3 * 32, 4 * 32, 3)


def test_secure_codec_rejects_the_wrong_key(monkeypatch, tmp_path, faces_dir, eval_bundle, key_file):
  PerfectExtractor(monkeypatch)
  tool = photo.Anonymizer(eval_bundle, keys.load(key_file), codec="secure")
  summary = report.run(tool, [os.path.join(faces_dir, "face0.png")], str(tmp_path))
  assert summary["wrong_key_rejected"] == 1.0 and not summary["failures"]
