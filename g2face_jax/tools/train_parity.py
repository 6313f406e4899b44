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
import re

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
STATISTICS = (".running_mean", ".running_var")  # BatchNorm buffers the fixture records


@functools.lru_cache(maxsize=2)
def _name_trees(folder: str) -> dict[str, dict]:
  """{our network: its variables with every leaf replaced by the official name
  '<net>/<key>' it comes from}, for the trainable tensors (those the fixture records a
  gradient norm of) and the BatchNorm running statistics.

  Each such tensor is filled with MARK + its index before conversion; other buffers
  (blur kernels, batch counters) keep their recipe values, which the converters check."""
  recipe = _recipe_g2face(folder)
  fixture_keys = set(load_keys(folder))
  names, marked = [], {}
  for short, (entry, _) in NETS.items():
    marked[entry] = dict(recipe[entry])
    for key, value in recipe[entry].items():
      if key.endswith(STATISTICS) or any(f"grad_norm/{phase}/{short}/{key}" in fixture_keys
                                         for phase in ("anon", "rec", "disc")):
        names.append(f"{short}/{key}")
        marked[entry][key] = np.full(np.shape(value), MARK + len(names), np.float32)
  converted = sources.convert_g2face(marked, config_lib.load("paper").model)

  def name_of(leaf):
    values = np.unique(np.asarray(leaf, np.float64))
    if values.size != 1 or values[0] <= MARK:
      raise ValueError(f"a converted tensor is not one official tensor: {values[:4]}")
    return names[int(values[0]) - MARK - 1]

  return {ours: jax.tree.map(name_of, converted[ours]) for _, ours in NETS.values()}


def official_names(folder: str) -> dict[str, dict]:
  """{our network: a tree like its params whose leaves are official names '<net>/<key>'}."""
  return {net: tree["params"] for net, tree in _name_trees(folder).items()}


def official_stat_names(folder: str) -> dict[str, dict]:
  """{network with BatchNorm: a tree like its batch_stats whose leaves are official
  buffer names '<net>/<module>.running_mean' / '.running_var'}."""
  return {net: tree["batch_stats"] for net, tree in _name_trees(folder).items()
          if "batch_stats" in tree}


def recipe_tensor(folder: str, name: str) -> np.ndarray:
  """The recipe weight of official parameter '<net>/<key>' (official layout)."""
  short, key = name.split("/", 1)
  return _recipe_g2face(folder)[NETS[short][0]][key]


def in_our_layout(folder: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{official name: tensor in the official layout} -> {official name: the same tensor
  laid out as our parameter of that name} (through the converters)."""
  converted = converted_with(folder, tensors)
  out = {}
  for net, names in official_names(folder).items():
    for name, leaf in zip(jax.tree.leaves(names), jax.tree.leaves(converted[net]["params"])):
      if name in tensors:
        out[name] = np.asarray(leaf)
  return out


# Gradients that are zero in exact arithmetic and float noise in float32 (the fixture
# README): conv biases right before an InstanceNorm or a train-mode BatchNorm, and the
# single-input-channel hiding injection at 8x8 whose fusion-mask InstanceNorm cancels
# about half its channels.
_ZERO_IN_EXACT_ARITHMETIC = re.compile(
    r"decoder/pyramid\.\d+\.(conv1|conv2|skip)\.conv\.bias|decoder/fusion_mask\.\d+\.conv\.bias"
    r"|extractor/body\.\d+\.(conv1x1_branch_1|conv3x3_branch_1|conv1x1_branch_2)\.bias"
    r"|decoder/hiding_injects\.8\.(conv|activate)\.bias")


def zero_in_exact_arithmetic(name: str) -> bool:
  """Whether the official parameter's gradient is zero in exact arithmetic."""
  return _ZERO_IN_EXACT_ARITHMETIC.fullmatch(name) is not None


def is_noise_weight(name: str) -> bool:
  """A NoiseInjection strength: one scalar whose gradient sums every pixel, compared
  against the phase's largest noise-weight gradient rather than itself."""
  return name.endswith("noise.weight")


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


def gradient_norm_errors(grads: dict, fixture: dict, phase: str) -> tuple[dict, dict]:
  """({official name: relative error of the norm of our gradient (absolute where the
  recorded norm is 0)}, {noise weight: error
  over the phase's largest recorded noise-weight gradient norm}) against
  `grad_norm/<phase>/*`, gradients zero in exact arithmetic left out. `grads`:
  {official name: gradient}, one for every recorded norm."""
  refs = {k.split("/", 2)[2]: float(fixture[k]) for k in fixture
          if k.startswith(f"grad_norm/{phase}/")}
  if set(refs) != set(grads):
    raise ValueError(f"{phase}: gradients and recorded norms differ: "
                     f"{sorted(set(refs) ^ set(grads))[:4]}")
  norms = {k: float(np.linalg.norm(np.asarray(v, np.float64))) for k, v in grads.items()}
  noise = [k for k in refs if is_noise_weight(k)]
  largest = max((refs[k] for k in noise), default=0.0)
  plain = {k: abs(norms[k] - refs[k]) / (refs[k] or 1.0) for k in refs
           if k not in noise and not zero_in_exact_arithmetic(k)}
  return plain, {k: abs(norms[k] - refs[k]) / largest for k in noise}


def check(folder: str) -> dict[str, tuple[float, float]]:
  """`g2face parity`'s training check: {quantity: (error, the README's tolerance)} of
  our iteration against the recorded one: every loss term, the anonymized image, the
  worst gradient norms of each phase (noise weights against the phase's largest), the
  BatchNorm statistics after the anonymize phase, the recover update norms' median, and
  the discriminator fed the recorded recovered image (and chained on ours)."""
  fixture = load(folder)
  ours = iteration(folder)
  out = {}
  for phase, tol in (("anon", 1e-4), ("rec", 1e-3), ("disc", 1e-4)):
    out.update({k: (e, tol) for k, e in loss_errors(ours[phase]["metrics"], fixture).items()})
  out.update({f"chained {k}": (e, 1e-3)
              for k, e in loss_errors(ours["disc_chained"]["metrics"], fixture).items()})
  out["anon/image"] = (parity.rel_err(ours["anon"]["image"], fixture["anon/image"]), 1e-4)
  none = {str(n) for n in fixture["grad_none/rec"]}
  for phase, tol, noise_tol in (("anon", 2e-3, 2e-3), ("rec", 3e-2, 3e-2), ("disc", 2e-3, 0)):
    grads = {k: v for k, v in ours[phase]["grads"].items() if k not in none or phase != "rec"}
    plain, noisy = gradient_norm_errors(grads, fixture, phase)
    out[f"{phase}/gradient norms (worst)"] = (max(plain.values()), tol)
    if noisy:
      out[f"{phase}/noise weight gradients"] = (max(noisy.values()), noise_tol)
  r1 = {k: v for k, v in ours["disc_r1"]["grads"].items()
        if f"grad_norm/disc_r1/{k}" in fixture}
  out["disc_r1/gradient norms (worst)"] = (max(gradient_norm_errors(r1, fixture,
                                                                    "disc_r1")[0].values()), 2e-3)
  out["anon/batchnorm statistics"] = (max(
      parity.rel_err(v, fixture[f"bn_after_anon/{k}"]) for k, v in ours["anon"]["stats"].items()),
      1e-4)
  rec_updates = [abs(float(np.linalg.norm(u)) - float(fixture[f"update_norm/rec/{k}"]))
                 / float(fixture[f"update_norm/rec/{k}"])
                 for k, u in ours["rec"]["update"].items()
                 if k not in none and not zero_in_exact_arithmetic(k)]
  out["rec/update norms (median)"] = (float(np.median(rec_updates)), 2e-3)
  return out


def _by_name(trees: dict, names: dict) -> dict[str, np.ndarray]:
  """{official name: leaf} of {network: tree} given {network: tree of names}."""
  out = {}
  for net, name_tree in names.items():
    if net in trees:
      out.update(zip(jax.tree.leaves(name_tree), map(np.asarray, jax.tree.leaves(trees[net]))))
  return out


def iteration(folder: str) -> dict[str, dict]:
  """Our training iteration on the folder's recorded one, phase by phase, in the
  fixture's names.

  anon: the anonymize phase from the recipe weights; rec: the recover phase on our own
  anonymize update (chained, as the official iteration); disc: the discriminator phase
  fed the recorded recovered image (R1 on); disc_r1: the R1 term alone. Each phase holds
  'grads' {official name: gradient}, 'update' {official name: change of the parameter
  by the phase's Adam step} (not disc_r1), 'metrics' (our loss terms) and, where it
  applies, 'image' (NCHW) and 'stats' {official buffer name: BatchNorm statistic after
  the phase}. disc_chained: the discriminator's metrics on our own recovered image."""
  fixture = load(folder)
  _, nets, settings, state, frozen = setup(folder)
  names, stat_names = official_names(folder), official_stat_names(folder)
  tr = settings.train
  x, d = images(fixture), draws(fixture)
  tx = state_lib.generator_optimizer(tr)
  out = {}

  def generator_update(params, opt_state, grads, frozen_labels):
    return state_lib.apply_generator_update(tx, tr, params, opt_state, grads, 1, frozen_labels)
  update = jax.jit(generator_update, static_argnums=3)

  def record(phase, grads, before, after, metrics, image=None, stats=None):
    changes = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                           after, before)
    out[phase] = dict(grads=_by_name(grads, names), update=_by_name(changes, names),
                      metrics=jax.device_get(metrics))
    if image is not None:
      out[phase]["image"] = parity.nchw(image)
    if stats is not None:
      out[phase]["stats"] = _by_name(stats, stat_names)

  grads, anonymized = jax.jit(functools.partial(step_lib.anonymize_phase, nets, settings))(
      state.params, state.batch_stats, state.disc_params, frozen, x, d)
  params, opt_state = update(state.params, state.opt_state, grads, ())
  record("anon", grads, state.params, params, anonymized["metrics"], anonymized["anon"],
         anonymized["stats"])

  grads, recovered = jax.jit(functools.partial(step_lib.recover_phase, nets, settings))(
      params, anonymized["stats"], state.disc_params, frozen, x, anonymized, d)
  after, _ = update(params, opt_state, grads, ("map_2_id",))
  stats = {**anonymized["stats"], "extractor": recovered["extractor_stats"]}
  record("rec", grads, params, after, recovered["metrics"], recovered["rec"], stats)

  disc = jax.jit(functools.partial(step_lib.discriminator_phase, nets, settings))
  disc_tx = state_lib.discriminator_optimizer(tr)
  grads, metrics = disc(state.disc_params, x, jnp.asarray(parity.nhwc(fixture["rec/image"])),
                        jnp.bool_(True))
  updates, _ = disc_tx.update(grads, disc_tx.init(state.disc_params), state.disc_params)
  out["disc"] = dict(grads=_by_name({"discriminator": grads}, names),
                     update=_by_name({"discriminator": updates}, names),
                     metrics=jax.device_get(metrics))
  r1 = jax.jit(jax.grad(lambda dp: settings.loss.r1 * step_lib.r1_penalty(
      nets, dp, x, tr.replica_batch)))(state.disc_params)
  out["disc_r1"] = dict(grads=_by_name({"discriminator": r1}, names))
  _, metrics = disc(state.disc_params, x, recovered["rec"], jnp.bool_(True))
  out["disc_chained"] = dict(metrics=jax.device_get(metrics))
  return out
