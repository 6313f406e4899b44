"""The official training iteration (`train_step.npz` of a parity fixture folder) set
up for our step: recipe weights as a fresh train state, the frozen networks, the
recorded draws, and the official parameter name of every leaf.

The fixture (the folder's README, "One training iteration") records iteration 16
with in-epoch index 0 of the first epoch: R1 on, the discriminator's fake input
is the recovered image, the first-epoch learning rates. Our step derives those
from its step counter, so the state starts at step 0 (t = 1: first epoch, index
0) with `r1_every` = 1 (R1 at t = 1); `replica_batch` and `global_batch` are the
fixture's batch. Nothing else of the paper config changes.

Official names are `<net>/<state-dict key>` with the fixture's short net names
(decoder, style_mlp, map_2_id, extractor, discriminator); `official_names`
finds each of our leaves' name by converting a state dict whose every tensor is
filled with its own index (the converters only move elements).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from g2face_jax import config as config_lib
from g2face_jax import models
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert import lpips as convert_lpips
from g2face_jax.convert import sources
from g2face_jax.tools import parity
from g2face_jax.train import state as state_lib
from g2face_jax.train import step as step_lib

FILE = "train_step.npz"
# fixture short name -> (G2Face.pth entry, our network)
NETS = {"decoder": ("anonymous_net", "decoder"), "style_mlp": ("style_mlp", "style_mapper"),
        "map_2_id": ("map_2_id", "map_2_id"), "extractor": ("hiding_extractor", "extractor"),
        "discriminator": ("discriminator", "discriminator")}


def load(folder: str) -> dict[str, np.ndarray]:
  """The folder's `train_step.npz` as a dict of arrays."""
  with np.load(os.path.join(folder, FILE)) as f:
    return {k: f[k] for k in f.files}


def batch_of(fixture: dict) -> int:
  return int(fixture["image"].shape[0])


def config_for(fixture: dict) -> ml_collections.ConfigDict:
  """The paper config with the fixture's batch and R1 at every iteration (see above)."""
  config = config_lib.load("paper")
  b = batch_of(fixture)
  config.train.global_batch = b
  config.train.replica_batch = b
  config.train.r1_every = 1
  config.mesh.data = 1
  config.mesh.fsdp = 1
  return config


def draws(fixture: dict) -> step_lib.Draws:
  """The iteration's recorded random numbers as our step's `Draws`."""
  return step_lib.Draws(
      anon_source=jnp.asarray(fixture["anon_bits_src"], jnp.float32),
      z=jnp.asarray(fixture["rand_z"], jnp.float32),
      anon_noise=[jnp.asarray(a) for a in parity.generator_noise(fixture, "anon_noise")],
      input_noise=jnp.asarray(parity.nhwc(fixture["extract_noise"])),
      rec_source=jnp.asarray(fixture["rec_bits_src"], jnp.float32),
      rec_noise=[jnp.asarray(a) for a in parity.generator_noise(fixture, "rec_noise")])


def images(fixture: dict) -> jax.Array:
  return jnp.asarray(parity.nhwc(fixture["image"]))


@functools.lru_cache(maxsize=2)
def _recipe_g2face(folder: str) -> dict[str, dict[str, np.ndarray]]:
  """`parity.recipe_g2face`, regenerated once per folder (callers copy before changing)."""
  return parity.recipe_g2face(folder)


def _recipe_lpips(folder: str) -> dict:
  weights = parity._weights(folder, "lpips_vgg")
  trunk = {k: v for k, v in weights.items() if k.startswith("features.")}
  heads = {k: v for k, v in weights.items() if k.startswith("lin")}
  return {"params": convert_lpips.convert_lpips(trunk, heads)}


@functools.lru_cache(maxsize=2)
def setup(folder: str):
  """(config, nets, settings, state at the recipe weights (step 0, fresh optimizers),
  frozen {'arcface', 'recon_net', 'lpips', 'bfm'}) for the folder's fixture."""
  fixture = load(folder)
  config = config_for(fixture)
  nets = models.Networks.from_config(config.model, models.TRAINING_NETWORKS)
  settings = step_lib.Settings.from_config(config, steps_per_epoch=1_000_000)
  content = parity.recipe_sources(folder)
  variables = parity.convert_sources({**content, "g2face": _recipe_g2face(folder)}, config.model)
  params = {n: variables[n]["params"] for n in state_lib.GENERATOR_NETS}
  disc_params = variables["discriminator"]["params"]
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats={n: variables[n]["batch_stats"] for n in state_lib.BATCH_STAT_NETS},
      opt_state=state_lib.generator_optimizer(config.train).init(params),
      disc_params=disc_params,
      disc_opt_state=state_lib.discriminator_optimizer(config.train).init(disc_params),
      rng=jax.random.key_data(jax.random.key(0)))
  frozen = {"arcface": variables["arcface"], "recon_net": variables["recon_net"],
            "lpips": _recipe_lpips(folder),
            "bfm": convert_bfm.load_mat(os.path.join(folder, "bfm_small", "BFM_model_front.mat"))}
  return config, nets, settings, state, frozen


def converted_with(folder: str, replacements: dict[str, np.ndarray]) -> dict[str, dict]:
  """{our network: variables} of the folder's recipe G2Face weights with some tensors
  replaced (`replacements`: official name '<net>/<key>' -> array in the official
  layout), through the converters: how a recorded official tensor is laid out here."""
  recipe = _recipe_g2face(folder)
  content = {entry: dict(recipe[entry]) for entry, _ in NETS.values()}
  for name, value in replacements.items():
    short, key = name.split("/", 1)
    content[NETS[short][0]][key] = np.asarray(value, np.float32)
  return sources.convert_g2face(content, config_lib.load("paper").model)


MARK = 1_000_000  # marks start here: above any recipe value, exact in float32


@functools.lru_cache(maxsize=2)
def official_names(folder: str) -> dict[str, dict]:
  """{our network: a tree like its params whose leaves are official names '<net>/<key>'}.

  Every trainable tensor (one the fixture records a gradient norm of) is filled with
  MARK + its index before conversion; buffers (blur kernels, BatchNorm statistics)
  keep their recipe values, which the converters check."""
  recipe = _recipe_g2face(folder)
  fixture_keys = set(load_keys(folder))
  names, marked = [], {}
  for short, (entry, _) in NETS.items():
    marked[entry] = dict(recipe[entry])
    for key, value in recipe[entry].items():
      if any(f"grad_norm/{phase}/{short}/{key}" in fixture_keys
             for phase in ("anon", "rec", "disc")):
        names.append(f"{short}/{key}")
        marked[entry][key] = np.full(np.shape(value), MARK + len(names), np.float32)
  converted = sources.convert_g2face(marked, config_lib.load("paper").model)

  def name_of(leaf):
    values = np.unique(np.asarray(leaf, np.float64))
    if values.size != 1 or values[0] <= MARK:
      raise ValueError(f"a converted parameter is not one official tensor: {values[:4]}")
    return names[int(values[0]) - MARK - 1]

  return {ours: jax.tree.map(name_of, converted[ours]["params"]) for _, ours in NETS.values()}


def load_keys(folder: str) -> list[str]:
  with np.load(os.path.join(folder, FILE)) as f:
    return list(f.files)


# our metric (after 'anon/', 'rec/' or 'disc/') -> the official loss term
TERMS = {"diversity": "id_dummy_diversity", "id_consistency": "id_gen_consist",
         "id_change": "id_loss", "id_same": "id_loss", "shape": "shape_loss",
         "landmark": "landmark_loss", "color": "color_loss", "l1": "l1_loss",
         "lpips": "lpips_loss", "gan": "gen_loss", "hiding": "hiding_loss", "total": "total",
         "real": "real_loss", "fake": "fake_loss", "r1": "grad_penalty_loss"}
DISC_TOTAL = {"disc/total": "disc/disc_loss"}


def loss_errors(metrics: dict, fixture: dict) -> dict[str, float]:
  """{our metric: relative error against the official term} for every term the fixture
  records (absolute error where the official value is exactly 0)."""
  out = {}
  for key, value in metrics.items():
    phase, _, term = key.partition("/")
    official = DISC_TOTAL.get(key) or f"{phase}/{TERMS.get(term, '')}"
    if official in fixture:
      ref = float(fixture[official])
      out[key] = abs(float(value) - ref) / (abs(ref) if ref else 1.0)
  return out


def check(folder: str) -> dict[str, float]:
  """`g2face parity`'s training check: the anonymize phase from the recorded draws
  (every loss term and the anonymized image) and the discriminator phase fed the
  recorded recovered image (its losses, R1 on), as relative errors."""
  import functools
  fixture = load(folder)
  _, nets, settings, state, frozen = setup(folder)
  x = images(fixture)
  _, aux = jax.jit(functools.partial(step_lib.anonymize_phase, nets, settings))(
      state.params, state.batch_stats, state.disc_params, frozen, x, draws(fixture))
  out = loss_errors(jax.device_get(aux["metrics"]), fixture)
  out["anon/image"] = parity.rel_err(parity.nchw(aux["anon"]), fixture["anon/image"])
  _, metrics = jax.jit(functools.partial(step_lib.discriminator_phase, nets, settings))(
      state.disc_params, x, jnp.asarray(parity.nhwc(fixture["rec/image"])), jnp.bool_(True))
  out.update(loss_errors(jax.device_get(metrics), fixture))
  return out
