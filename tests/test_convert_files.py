"""`g2face convert` on files saved with torch.save in the official layouts, the
bundle it writes, and the errors for wrong, truncated and missing files."""
import argparse
import fractions
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import FIXTURES
from g2face_jax import bundle, cli, models
from g2face_jax.tools import parity
from g2face_jax.convert import checkpoint_io, sources
from g2face_jax.convert.table import ConversionError

BFM_MAT = os.path.join(FIXTURES, "bfm_small", "BFM_model_front.mat")


def _torch_tree(tree):
  if isinstance(tree, dict):
    return {k: _torch_tree(v) for k, v in tree.items()}
  return torch.from_numpy(np.ascontiguousarray(tree))


def _training_extras():
  """What a G2Face training copy holds besides weights: counters, optimizers and the
  warm-up scheduler's state, whose `after_scheduler` is an ExponentialLR object."""
  param = torch.nn.Parameter(torch.zeros(2))
  adam = torch.optim.Adam([param], lr=1e-3, betas=(0.0, 0.999))
  param.grad = torch.ones(2)
  adam.step()
  decay = torch.optim.lr_scheduler.ExponentialLR(adam, gamma=0.95)
  return {"epoch": 3, "iter": 1200, "optimizer": adam.state_dict(),
          "optimizer_D": adam.state_dict(),
          "scheduler": {"multiplier": 1, "total_epoch": 10, "finished": True,
                        "after_scheduler": decay, "base_lrs": [1e-3], "last_epoch": 12}}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
  """Recipe weights of the fixture folder written as the official files."""
  folder = tmp_path_factory.mktemp("official_files")
  content = parity.recipe_sources(FIXTURES)
  paths = {"g2face": folder / "G2Face.pth", "arcface": folder / "ms1mv3_arcface_r50.pth",
           "d3dfr": folder / "epoch_20.pth"}
  torch.save({**_torch_tree(content["g2face"]), **_training_extras()}, paths["g2face"])
  torch.save(_torch_tree(content["arcface"]), paths["arcface"])
  torch.save(_torch_tree(content["d3dfr"]), paths["d3dfr"])
  return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def official_bundle(official_files, tmp_path_factory):
  out = tmp_path_factory.mktemp("bundles") / "official"
  code = cli.main(["convert", "--g2face", official_files["g2face"], "--arcface",
                   official_files["arcface"], "--d3dfr", official_files["d3dfr"], "--bfm", BFM_MAT,
                   "--out", str(out)])
  assert code == 0
  return str(out)


def test_manifest_records_config_networks_and_source_hashes(official_bundle, official_files):
  with open(os.path.join(official_bundle, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["config"]["model"]["size"] == 256
  assert manifest["networks"] == sorted(["decoder", "style_mapper", "map_2_id", "extractor",
                                         "discriminator", "arcface", "recon_net"])
  assert manifest["bfm"] is True
  assert manifest["sources"]["g2face"]["sha256"] == bundle.sha256_of(official_files["g2face"])
  assert manifest["sources"]["bfm"]["file"] == "BFM_model_front.mat"


def test_bundle_reproduces_the_official_pipeline_without_torch(official_bundle):
  script = f"""
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
from g2face_jax import bundle, models
from g2face_jax.tools import parity
b = bundle.load({official_bundle!r})
b.require(*models.INFERENCE_NETWORKS, purpose="run the pipeline")
errs = parity.compare_pipeline(models.Networks.from_config(b.config.model), b.variables, {FIXTURES!r})
assert "torch" not in sys.modules, "bundle.load imported torch"
print(json.dumps(errs))
"""
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  errs = json.loads(run.stdout.strip().splitlines()[-1])
  bad = {k: v for k, v in errs.items() if not v <= parity.TOLERANCE}
  assert not bad, bad


def test_bundle_bfm_round_trips(official_bundle):
  from g2face_jax.convert import bfm as convert_bfm
  loaded = bundle.load(official_bundle).bfm
  direct = convert_bfm.load_mat(BFM_MAT)
  for name in ("mean_shape", "id_base", "exp_base", "face_buf", "point_buf", "keypoints"):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(direct, name))


def _convert(capsys, *argv):
  code = cli.main(["convert", *argv])
  err = capsys.readouterr().err.strip()
  return code, err


def test_wrong_kind_of_file_names_what_was_expected_and_found(official_files, tmp_path, capsys):
  code, err = _convert(capsys, "--g2face", official_files["arcface"], "--out", str(tmp_path / "b"))
  assert code == 2 and len(err.splitlines()) == 1
  assert "ms1mv3_arcface_r50.pth" in err
  assert "expected a G2Face checkpoint" in err and "found an ArcFace iresnet state dict" in err
  code, err = _convert(capsys, "--arcface", official_files["d3dfr"], "--out", str(tmp_path / "c"))
  assert code == 2 and "expected an ArcFace" in err and "found a Deep3DFaceRecon" in err
  code, err = _convert(capsys, "--bfm", official_files["d3dfr"], "--out", str(tmp_path / "d"))
  assert code == 2 and len(err.splitlines()) == 1 and "not a readable MATLAB .mat file" in err
  assert not os.path.exists(tmp_path / "b")  # nothing half-written


def test_truncated_and_missing_files(official_files, tmp_path, capsys):
  cut = tmp_path / "G2Face_truncated.pth"
  with open(official_files["g2face"], "rb") as f:
    cut.write_bytes(f.read(200_000))
  code, err = _convert(capsys, "--g2face", str(cut), "--out", str(tmp_path / "b"))
  assert code == 2 and len(err.splitlines()) == 1
  assert str(cut) in err and "not a PyTorch checkpoint" in err
  code, err = _convert(capsys, "--g2face", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "b"))
  assert code == 2 and "nope.pth: file not found" in err


def test_objects_outside_the_allow_list_are_refused(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"anonymous_net": {}, "payload": fractions.Fraction(1, 3)}, path)
  with pytest.raises(ConversionError, match=r"evil\.pth: refused to load 'fractions\.Fraction'"):
    checkpoint_io.load_state_file(path)


def test_stylegan2_file_with_args_namespace_loads(tmp_path):
  """550000.pt holds `args` (argparse.Namespace) beside the weights."""
  path = tmp_path / "550000.pt"
  torch.save({"g_ema": {"input.input": torch.ones(1, 4, 4, 4)}, "d": {}, "g": {},
              "args": argparse.Namespace(size=256, channel_multiplier=2)}, path)
  content = checkpoint_io.load_state_file(path)
  assert sources.describe(content) == sources.STYLEGAN2
  assert content["args"].size == 256
  np.testing.assert_array_equal(content["g_ema"]["input.input"], np.ones((1, 4, 4, 4), np.float32))


def test_bundle_names_what_it_lacks(official_files, tmp_path):
  out = tmp_path / "arcface_only"
  cli.main(["convert", "--arcface", official_files["arcface"], "--out", str(out)])
  b = bundle.load(out)
  b.require("arcface", purpose="embed faces")
  with pytest.raises(bundle.BundleError, match=r"bundle has no decoder, recon_net, needed to anonymize "
                     r"\(decoder comes from `g2face convert --g2face"):
    b.require("decoder", "recon_net", "arcface", purpose="anonymize")


def test_not_a_bundle(tmp_path):
  with pytest.raises(bundle.BundleError, match="not a g2face bundle"):
    bundle.load(tmp_path)
  with pytest.raises(bundle.BundleError, match="bundle folder not found"):
    bundle.load(tmp_path / "missing")


def test_output_folder_must_be_new_or_empty(official_files, tmp_path, capsys):
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  code, err = _convert(capsys, "--arcface", official_files["arcface"], "--out", str(tmp_path / "taken"))
  assert code == 2 and "output exists and is not an empty folder" in err
