"""Training starts from the official `G2Face.pth`: fine-tuning a trained model.

The official file is the parity fixtures' recipe G2Face cut down to the tiny config:
each state dict (anonymous_net, style_mlp, map_2_id, hiding_extractor,
discriminator) keeps the keys the converter's own rule tables map onto the tiny
networks, each tensor cut to the tiny shapes (the extractor's output conv, one
channel at 256 and 64 at 32, takes its extra channels from the recipe's one),
saved with torch.save in the official layout together with the training entries
of a real checkpoint (epoch, iter, optimizer, optimizer_D). The frozen networks
and the BFM are the files of test_train_bundle. The checks compare what the run
starts from with the official tensors through NumPy layout changes written out here.
"""
import functools
import json
import os
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import FIXTURES
from flax import traverse_util
from g2face_jax import bundle, cli, models
from g2face_jax import config as config_lib
from g2face_jax.convert import mapping as convert_mapping
from g2face_jax.convert import sources as convert_sources
from g2face_jax.convert import stylegan as convert_stylegan
from g2face_jax.tools import parity
from g2face_jax.train import pretrained as pretrained_lib
from g2face_jax.train import sharding
from g2face_jax.train import state as state_lib
from test_train_bundle import _cropped, _flat, _torch_tree, hwio, official  # noqa: F401


def _shapes(tree):
  return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(tree).items()}


def _rule_tables(model):
  """{official entry: (the converter's rules, {rule target: tiny shape})}."""
  net = lambda name: models.abstract_variables(model, name)  # noqa: E731
  decoder, disc = net("decoder")["params"], net("discriminator")["params"]
  final_channels = disc["final_conv"]["conv"]["weight"].shape[-1]
  return {
      "anonymous_net": (convert_stylegan.DECODER_RULES,
                        _shapes(convert_stylegan._flax_names(decoder))),
      "discriminator": (convert_stylegan._discriminator_rules(final_channels),
                        _shapes(convert_stylegan._flax_names(disc))),
      "style_mlp": (convert_mapping.STYLE_MLP_RULES, _shapes(net("style_mapper"))),
      "map_2_id": (convert_mapping.MAP_2_ID_RULES, _shapes(net("map_2_id"))),
      "hiding_extractor": (convert_mapping.HIDING_EXTRACTOR_RULES, _shapes(net("extractor"))),
  }


def _more_outputs(value, n):
  """(C, ...) official tensor with C < n outputs -> (n, ...): output k is output k % C
  rolled by k // C places, so that the outputs differ."""
  return np.stack([np.roll(value[k % len(value)], k // len(value)) for k in range(n)])


def _tiny_state_dict(state_dict, rules, want):
  """An official state dict cut to the tiny networks: every key a rule maps onto a tiny
  parameter, cut to its shape; the constants (FIR kernels, num_batches_tracked) of the
  blocks kept; keys of blocks the tiny network lacks dropped."""
  out, constants = {}, {}
  for key, value in state_dict.items():
    match = next(((r, m) for r in rules for m in [re.fullmatch(r.pattern, key)] if m), None)
    if match is None:
      constants[key] = value
      continue
    rule, m = match
    target = m.expand(rule.target)
    if target not in want:
      continue
    shape = want[target]
    if key == "final_linear.0.weight":  # (out, C*4*4) reading the NCHW flatten
      c = shape[0] // 16
      cut = value.reshape(value.shape[0], -1, 16)[:shape[1], :c].reshape(shape[1], c * 16)
    else:
      cut = _cropped(value, rule.transform, shape)
      if rule.transform(cut).shape != shape:  # more outputs than the recipe's (axis 0)
        cut = _cropped(_more_outputs(value, shape[-1]), rule.transform, shape)
    out[key] = np.ascontiguousarray(cut)
  blocks = {".".join(k.split(".")[:2]) for k in out}
  out.update({k: v for k, v in constants.items() if ".".join(k.split(".")[:2]) in blocks})
  return out


def _adam_state_dict(n_params, step):
  """A PyTorch Adam `state_dict()` as the official training copies hold it."""
  return {"state": {i: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(3),
                        "exp_avg_sq": torch.ones(3)} for i in range(n_params)},
          "param_groups": [{"lr": 1e-3, "betas": (0.0, 0.999), "eps": 1e-8,
                            "weight_decay": 0, "amsgrad": False, "maximize": False,
                            "foreach": None, "capturable": False, "differentiable": False,
                            "fused": None, "params": list(range(n_params))}]}


@pytest.fixture(scope="module")
def g2face_pth(tmp_path_factory):
  """(path of a tiny-config G2Face.pth, its state dicts as NumPy)."""
  model = config_lib.load("tiny").model
  recipe = parity.recipe_g2face(FIXTURES)
  content = {entry: _tiny_state_dict(recipe[entry], *table)
             for entry, table in _rule_tables(model).items()}
  path = str(tmp_path_factory.mktemp("g2face") / "G2Face.pth")
  training = {"epoch": 12, "iter": 34_000, "optimizer": _adam_state_dict(4, 34_000),
              "optimizer_D": _adam_state_dict(2, 34_000)}
  torch.save({**_torch_tree(content), **training}, path)
  return path, content


@pytest.fixture(scope="module")
def g2face_bundle(g2face_pth, official, tmp_path_factory):
  files, _ = official
  out = str(tmp_path_factory.mktemp("bundles") / "g2face")
  argv = ["convert", "--config", "tiny", "--g2face", g2face_pth[0], "--out", out]
  for name in ("arcface", "d3dfr", "lpips_vgg16", "lpips_heads", "bfm"):
    argv += [f"--{name.replace('_', '-')}", files[name]]
  assert cli.main(argv) == 0
  return out


def test_the_tiny_file_holds_each_official_network_cut_by_the_rule_tables(g2face_pth):
  _, content = g2face_pth
  assert sorted(content) == sorted(convert_sources.G2FACE_PARTS)
  # blocks beyond the tiny 32x32 model are gone, the FIR kernels of those kept are there
  dec, disc = content["anonymous_net"], content["discriminator"]
  assert "convs.5.conv.weight" in dec and not any(k.startswith("convs.6.") for k in dec)
  assert "convs.4.conv.blur.kernel" in dec and "convs.3.skip.0.kernel" in disc
  assert not any(k.startswith("convs.4.") for k in disc)
  assert "map_2_id.4.num_batches_tracked" in content["map_2_id"]
  out = content["hiding_extractor"]["conv1x1_output.weight"]
  assert out.shape == (64, 128, 3, 3) and len({o.tobytes() for o in out}) == 64


def test_convert_reads_g2face_pth_beside_its_training_entries(g2face_bundle, official):
  files, _ = official
  with open(os.path.join(g2face_bundle, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["networks"] == sorted(models.TRAINING_NETWORKS)
  assert manifest["bfm"] is True
  assert set(manifest["sources"]) == {"g2face", "arcface", "d3dfr", "lpips_vgg16",
                                      "lpips_heads", "bfm"}
  b = bundle.load(g2face_bundle)
  assert pretrained_lib.is_g2face_start(b)
  assert pretrained_lib.describe_start(b) == f"the G2Face model of {g2face_bundle}"


def _zero(tree):
  return all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(tree))


def test_g2face_start_takes_all_five_networks_and_keeps_the_optimizer_fresh(
    g2face_bundle, g2face_pth):
  _, official_dicts = g2face_pth
  config = config_lib.load(f"tiny,pretrained.bundle={g2face_bundle}")
  b = pretrained_lib.open_bundle(config)  # checks every start network fits the model
  init = functools.partial(state_lib.init_state, config)  # as the loop's runtime.init_state
  key = jax.random.key(config.train.seed)
  state_sharding = sharding.state_shardings(jax.eval_shape(init, key),
                                            sharding.make_mesh(config.mesh), config.mesh)
  fresh = jax.jit(init, out_shardings=state_sharding)(key)
  started = jax.device_get(pretrained_lib.start_state(fresh, b, state_sharding))
  fresh = jax.device_get(fresh)

  # every generator network, its BatchNorm statistics and the discriminator: the bundle's
  for name in state_lib.GENERATOR_NETS:
    got, want = _flat(started.params[name]), _flat(b.variables[name]["params"])
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
  assert set(started.batch_stats) == set(state_lib.BATCH_STAT_NETS)
  for name in state_lib.BATCH_STAT_NETS:
    got, want = _flat(started.batch_stats[name]), _flat(b.variables[name]["batch_stats"])
    assert got.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
  got, want = _flat(started.disc_params), _flat(b.variables["discriminator"]["params"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=f"discriminator {k}")

  # ... which are the official tensors in Flax layout
  p, stats = started.params, started.batch_stats
  dec = official_dicts["anonymous_net"]
  np.testing.assert_array_equal(p["decoder"]["conv1"]["conv"]["weight"],
                                np.transpose(dec["conv1.conv.weight"][0], (2, 3, 1, 0)))
  np.testing.assert_array_equal(p["decoder"]["input"]["input"],
                                np.transpose(dec["input.input"], (0, 2, 3, 1)))
  np.testing.assert_array_equal(p["decoder"]["pyramid_2"]["conv2"]["conv"]["kernel"],
                                hwio(dec["pyramid.2.conv2.conv.weight"]))
  np.testing.assert_array_equal(p["decoder"]["hiding_injects_3"]["weight"],
                                dec["hiding_injects.3.weight"].reshape(-1))
  np.testing.assert_array_equal(p["decoder"]["fusion_mask_1"]["conv"]["kernel"],
                                hwio(dec["fusion_mask.1.conv.weight"]))
  mlp = official_dicts["style_mlp"]
  np.testing.assert_array_equal(p["style_mapper"]["style_middle_0"]["weight"],
                                mlp["style_middle.0.weight"].T)
  np.testing.assert_array_equal(p["style_mapper"]["style_high_3"]["bias"],
                                mlp["style_high.3.bias"])
  m2i = official_dicts["map_2_id"]
  np.testing.assert_array_equal(p["map_2_id"]["fc2"]["kernel"], m2i["map_2_id.2.weight"].T)
  np.testing.assert_array_equal(p["map_2_id"]["bn"]["scale"], m2i["map_2_id.4.weight"])
  np.testing.assert_array_equal(stats["map_2_id"]["bn"]["mean"], m2i["map_2_id.4.running_mean"])
  np.testing.assert_array_equal(stats["map_2_id"]["bn"]["var"], m2i["map_2_id.4.running_var"])
  ext = official_dicts["hiding_extractor"]
  np.testing.assert_array_equal(p["extractor"]["body_1"]["conv3x3_branch_1"]["kernel"],
                                hwio(ext["body.1.conv3x3_branch_1.weight"]))
  np.testing.assert_array_equal(p["extractor"]["conv1x1_output"]["kernel"],
                                hwio(ext["conv1x1_output.weight"]))
  np.testing.assert_array_equal(stats["extractor"]["body_2"]["bn_branch_1_2"]["var"],
                                ext["body.2.bn_branch_1_2.running_var"])
  np.testing.assert_array_equal(stats["extractor"]["body_0"]["bn_branch_2_1"]["mean"],
                                ext["body.0.bn_branch_2_1.running_mean"])
  disc = official_dicts["discriminator"]
  d = started.disc_params
  np.testing.assert_array_equal(d["convs_1"]["conv1"]["conv"]["weight"],
                                hwio(disc["convs.1.conv1.0.weight"]))
  np.testing.assert_array_equal(d["convs_2"]["skip"]["conv"]["weight"],
                                hwio(disc["convs.2.skip.1.weight"]))
  w = disc["final_linear.0.weight"]  # (out, C*4*4) over NCHW -> (4*4*C, out) over NHWC
  c = w.shape[1] // 16
  np.testing.assert_array_equal(
      d["final_linear_0"]["weight"],
      w.reshape(-1, c, 4, 4).transpose(2, 3, 1, 0).reshape(16 * c, -1))
  np.testing.assert_array_equal(d["final_linear_1"]["weight"], disc["final_linear.1.weight"].T)

  # the optimizers start fresh: Adam's moments and counts at zero, iteration 0
  assert int(started.step) == 0
  assert jax.tree.structure(started.opt_state) == jax.tree.structure(fresh.opt_state)
  assert _zero(started.opt_state) and _zero(started.disc_opt_state)
  np.testing.assert_array_equal(started.rng, fresh.rng)


@pytest.mark.slow  # one tiny iteration, compiled: ~2 min on 2 busy cores
def test_one_training_step_from_g2face_pth(g2face_bundle, tmp_path, capsys):
  code = cli.main(["train", "--config", ",".join((
      "tiny", f"pretrained.bundle={g2face_bundle}", "train.num_steps=1", "log.samples=1",
      "log.sample_every_steps=0", "checkpoint.async_save=false")),
      "--workdir", str(tmp_path / "work")])
  out = capsys.readouterr()
  assert code == 0, out.err[-2000:]
  assert f"starting from step 0 with the G2Face model of {g2face_bundle}" in out.out
