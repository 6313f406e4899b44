"""Training reads every pretrained network from a bundle made by `g2face convert`.

The official files are the parity fixtures' recipe weights cut down to the tiny
config (block 0 of each ResNet stage of ArcFace and the 3DMM regressor; the
StyleGAN2 synthesis layers up to 32x32 with the tiny widths), random LPIPS
weights in the torchvision / lpips layouts, and the fixtures' small BFM, saved
with torch.save. The checks compare what training uses with the official
tensors through NumPy layout changes written out here.
"""
import json
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import FIXTURES
from g2face_jax import bundle, cli, models
from g2face_jax import config as config_lib
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert import stylegan as convert_stylegan
from g2face_jax.tools import parity
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import pretrained as pretrained_lib
from g2face_jax.train import state as state_lib
from test_lpips import random_state_dicts

BFM_MAT = os.path.join(FIXTURES, "bfm_small", "BFM_model_front.mat")
SYNTHESIS = ("input.", "conv1.", "to_rgb1.", "convs.", "to_rgbs.")


def _first_blocks(state_dict):
  """A ResNet state dict with only block 0 of every stage (the tiny (1, 1, 1, 1) depth)."""
  return {k: v for k, v in state_dict.items()
          if not re.search(r"layer\d\.(\d+)\.", k) or re.search(r"layer\d\.0\.", k)}


def _cropped(official, transform, target_shape):
  """The sub-array of `official` that `transform` (an axis permutation or a flatten of
  unit axes) maps onto the leading `target_shape` box of its output."""
  index = transform(np.arange(official.size).reshape(official.shape))
  kept = index[tuple(slice(0, n) for n in target_shape)].ravel()
  axes = np.unravel_index(kept, official.shape)
  return official[np.ix_(*[np.unique(a) for a in axes])]


def tiny_g_ema(generator, model):
  """A rosinality `g_ema` for `model` from the recipe generator's synthesis tensors, each
  cut to the tiny widths; the FIR kernels are kept and the unused mapping added."""
  decoder = models.abstract_variables(model, "decoder")["params"]
  want = {"/".join(k): v.shape for k, v in _flat(convert_stylegan._flax_names(decoder)).items()}
  g = {}
  for key, value in generator.items():
    if not key.startswith(SYNTHESIS):
      continue
    if re.fullmatch(r".*\.(blur|upsample)\.kernel", key):
      g[key] = value
      continue
    for rule in convert_stylegan.SYNTHESIS_RULES:
      m = re.fullmatch(rule.pattern, key)
      if m:
        break
    target = m.expand(rule.target)
    if target in want:
      g[key] = np.ascontiguousarray(_cropped(value, rule.transform, want[target]))
  g["style.1.weight"] = np.ones((model.style_dim, model.style_dim), np.float32)
  g["style.1.bias"] = np.zeros(model.style_dim, np.float32)
  return g


def _flat(tree):
  return {tuple(getattr(p, "key", str(p)) for p in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _torch_tree(tree):
  if isinstance(tree, dict):
    return {k: _torch_tree(v) for k, v in tree.items()}
  return torch.from_numpy(np.ascontiguousarray(tree))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  """{option: official file} of a tiny training start, and their content."""
  folder = tmp_path_factory.mktemp("start_files")
  model = config_lib.load("tiny").model
  recipe = parity.recipe_sources(FIXTURES)
  vgg, heads = random_state_dicts(seed=7)
  content = {"arcface": _first_blocks(recipe["arcface"]),
             "d3dfr": {"net_recon": _first_blocks(recipe["d3dfr"]["net_recon"])},
             "stylegan": {"g_ema": tiny_g_ema(recipe["g2face"]["anonymous_net"], model),
                          "d": {}, "g": {}},
             "lpips_vgg16": vgg, "lpips_heads": heads}
  files = {}
  for name, tree in content.items():
    files[name] = str(folder / f"{name}.pth")
    torch.save(_torch_tree(tree), files[name])
  files["bfm"] = BFM_MAT
  return files, content


@pytest.fixture(scope="module")
def start_bundle(official, tmp_path_factory):
  files, _ = official
  out = str(tmp_path_factory.mktemp("bundles") / "start")
  argv = ["convert", "--config", "tiny", "--out", out]
  for name, path in files.items():
    argv += [f"--{name.replace('_', '-')}", path]
  assert cli.main(argv) == 0
  return out


def _tiny(*overrides):
  return config_lib.load(",".join(("tiny",) + overrides))


def hwio(oihw):
  return np.transpose(oihw, (2, 3, 1, 0))


def test_convert_writes_every_part_of_a_training_start(start_bundle, official):
  files, _ = official
  with open(os.path.join(start_bundle, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["networks"] == ["arcface", "decoder", "lpips", "recon_net"]
  assert manifest["bfm"] is True
  assert set(manifest["sources"]) == set(files)


def test_training_uses_the_bundles_frozen_networks_and_bfm(start_bundle, official):
  _, content = official
  config = _tiny(f"pretrained.bundle={start_bundle}")
  frozen = frozen_lib.frozen_variables(config, seed=1)  # what the loop and export use
  b = bundle.load(start_bundle)
  for name in pretrained_lib.FROZEN_NETS:
    got, want = _flat(frozen[name]), _flat(b.variables[name])
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
  # ... which are the official tensors in Flax layout
  arc, rec = content["arcface"], content["d3dfr"]["net_recon"]
  np.testing.assert_array_equal(frozen["arcface"]["params"]["conv1"]["kernel"],
                                hwio(arc["conv1.weight"]))
  np.testing.assert_array_equal(frozen["arcface"]["batch_stats"]["layer2_0"]["bn1"]["var"],
                                arc["layer2.0.bn1.running_var"])
  backbone = frozen["recon_net"]["params"]["backbone"]
  np.testing.assert_array_equal(backbone["layer4_0"]["conv2"]["kernel"],
                                hwio(rec["backbone.layer4.0.conv2.weight"]))
  lpips_kernels = [v for k, v in _flat(frozen["lpips"]).items() if k[-1] == "kernel"]
  assert any(np.array_equal(v, hwio(content["lpips_vgg16"]["features.0.weight"]))
             for v in lpips_kernels)
  direct = convert_bfm.load_mat(BFM_MAT)
  for field in ("mean_shape", "id_base", "exp_base", "face_buf", "point_buf", "keypoints"):
    np.testing.assert_array_equal(getattr(frozen["bfm"], field), getattr(direct, field))


def test_stylegan2_start_replaces_only_the_synthesis_layers(start_bundle, official):
  _, content = official
  g_ema = content["stylegan"]["g_ema"]
  config = _tiny(f"pretrained.bundle={start_bundle}")
  b = pretrained_lib.open_bundle(config)
  fresh = state_lib.init_state(config, jax.random.key(config.train.seed))
  fresh = jax.device_get(fresh)
  params, stats, disc = pretrained_lib.start_variables(b, fresh.params, fresh.batch_stats,
                                                       fresh.disc_params)
  decoder, before = params["decoder"], fresh.params["decoder"]
  np.testing.assert_array_equal(decoder["conv1"]["conv"]["weight"],
                                np.transpose(g_ema["conv1.conv.weight"][0], (2, 3, 1, 0)))
  np.testing.assert_array_equal(decoder["convs_5"]["conv"]["modulation"]["weight"],
                                g_ema["convs.5.conv.modulation.weight"].T)
  np.testing.assert_array_equal(decoder["to_rgbs_2"]["bias"], g_ema["to_rgbs.2.bias"].ravel())
  np.testing.assert_array_equal(decoder["input"]["input"],
                                np.transpose(g_ema["input.input"], (0, 2, 3, 1)))
  labels = state_lib.generator_labels({"decoder": decoder})["decoder"]
  for top in decoder:
    new = not any(lab == "pretrained" for lab in jax.tree.leaves(labels[top]))
    for a, f in zip(jax.tree.leaves(decoder[top]), jax.tree.leaves(before[top])):
      assert np.array_equal(a, f) == new, top  # new parts: the run's own initialisation
  for name in ("style_mapper", "map_2_id", "extractor"):
    assert params[name] is fresh.params[name]
  assert all(stats[n] is fresh.batch_stats[n] for n in stats) and disc is fresh.disc_params


def _train(capsys, tmp_path, *overrides):
  code = cli.main(["train", "--config", ",".join(("tiny",) + overrides),
                   "--workdir", str(tmp_path / "work")])
  return code, capsys.readouterr()


def test_a_bundle_without_a_needed_part_is_named_in_one_line(official, tmp_path, capsys):
  files, _ = official
  partial = str(tmp_path / "partial")
  assert cli.main(["convert", "--config", "tiny", "--arcface", files["arcface"], "--d3dfr",
                   files["d3dfr"], "--bfm", BFM_MAT, "--out", partial]) == 0
  code, out = _train(capsys, tmp_path, f"pretrained.bundle={partial}")
  err = out.err.strip()
  assert code == 2 and "\n" not in err, err
  assert err.startswith(f"g2face train: error: {partial}: bundle has no lpips, decoder")
  assert "--lpips-vgg16 and --lpips-heads" in err and "--stylegan" in err


def test_a_bundle_of_another_model_is_refused_in_one_line(start_bundle, tmp_path, capsys):
  code, out = _train(capsys, tmp_path, f"pretrained.bundle={start_bundle}", "model.style_dim=16")
  err = out.err.strip()
  assert code == 2 and "\n" not in err, err
  assert err.startswith(f"g2face train: error: {start_bundle}: the bundle's decoder does not fit")
  assert "model style_dim=32" in err


@pytest.mark.slow  # one tiny iteration, compiled: ~2 min on 2 busy cores
def test_one_training_step_from_the_bundle(start_bundle, official, tmp_path, capsys):
  """`g2face train` from the bundle, then `g2face export`: the exported model holds the
  bundle's frozen networks and BFM, and (with the pretrained group's lr at 0) the
  StyleGAN2 synthesis layers exactly as converted, while the new parts trained."""
  code, out = _train(capsys, tmp_path, f"pretrained.bundle={start_bundle}",
                     "train.num_steps=1", "train.pretrained_lr_mult=0.0", "log.samples=1")
  assert code == 0, out.err[-2000:]
  assert f"starting from step 0 with the StyleGAN2 synthesis layers of {start_bundle}" in out.out
  exported = str(tmp_path / "exported")
  assert cli.main(["export", "--workdir", str(tmp_path / "work"), "--out", exported]) == 0
  b, e = bundle.load(start_bundle), bundle.load(exported)
  for name in pretrained_lib.FROZEN_NETS:
    for (k, want), got in zip(_flat(b.variables[name]).items(),
                              _flat(e.variables[name]).values()):
      np.testing.assert_array_equal(got, want, err_msg=f"{name} {k}")
  np.testing.assert_array_equal(e.bfm.id_base, b.bfm.id_base)
  assert e.manifest["sources"] == b.manifest["sources"]
  labels = state_lib.generator_labels({"decoder": e.variables["decoder"]["params"]})["decoder"]
  trained = _flat(e.variables["decoder"]["params"])
  start = _flat(b.variables["decoder"]["params"])
  groups = _flat(labels)
  synthesis = [k for k in trained if groups[k] == "pretrained"]
  assert synthesis and len(synthesis) < len(trained)
  for k in synthesis:
    np.testing.assert_array_equal(trained[k], start[k], err_msg=str(k))
  assert any(not np.array_equal(trained[k], start[k]) for k in trained if groups[k] == "new")
