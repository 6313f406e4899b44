"""The converted networks a training run starts from: the bundle of `pretrained.bundle`.

A bundle written by `g2face convert` (or `g2face export`) for the run's model gives
the frozen networks (ArcFace, the 3DMM regressor, LPIPS) and the BFM, and with
`pretrained.start` the generator's start, of one of two kinds:
  StyleGAN2  the bundle has a decoder but no style mapper (`g2face convert --stylegan`):
             the decoder's StyleGAN2 synthesis layers (the optimizer's 'pretrained'
             group) replace the freshly initialised ones; the decoder's new parts
             (pyramid, fusion masks, hiding injections) and the other generator
             networks keep the run's own initialisation, as the official non-strict
             load of `550000.pt`. A discriminator in the bundle
             (`--stylegan-discriminator`) replaces the fresh one.
  G2Face     the bundle has the style mapper too (`--g2face`, or a bundle exported
             from a run): every generator network, with its BatchNorm statistics, and
             the discriminator, whole (fine-tuning a trained model).
Every network read must have the shapes the run's `model` section builds.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from g2face_jax import bundle
from g2face_jax.train import state as state_lib

FROZEN_NETS = ("arcface", "recon_net", "lpips")
PURPOSE = "train this config (pretrained.bundle)"

# What a run without a bundle lacks: the official file of each part, where it comes from,
# and the `g2face convert` option that reads it.
OFFICIAL_FILES = (
    ("ArcFace", "ms1mv3_arcface_r50.pth (insightface arcface_torch model zoo)", "--arcface"),
    ("the 3DMM regressor", "epoch_20.pth (Deep3DFaceRecon_pytorch, checkpoints/)", "--d3dfr"),
    ("LPIPS", "vgg16-397923af.pth (torchvision) and vgg.pth (lpips v0.1 weights)",
     "--lpips-vgg16/--lpips-heads"),
    ("the Basel Face Model", "BFM_model_front.mat (Deep3DFaceRecon_pytorch, BFM/)", "--bfm"),
    ("the StyleGAN2 start", "550000.pt (rosinality stylegan2-pytorch, FFHQ 256)", "--stylegan"),
)


class MissingPretrained(ValueError):
  """The config trains from pretrained networks or real data it was not given."""


def preflight(config: ml_collections.ConfigDict) -> list[str]:
  """Refuse (MissingPretrained, one line) a run that would silently train the wrong model:
  no bundle without `pretrained.allow_random`, or the demo faces without `data.allow_demo`.
  Returns the lines to log about what the run stands in for (random networks, demo data)."""
  p, data, lines = config.pretrained, config.data, []
  if not p.bundle:
    if not p.allow_random:
      missing = "; ".join(f"{part}: {file} [{option}]" for part, file, option in OFFICIAL_FILES)
      raise MissingPretrained(
          f"config '{config.variant}' trains from pretrained networks and pretrained.bundle is "
          f"empty. Missing: {missing}. Convert them into one bundle with `g2face convert "
          f"--config {config.variant} --out BUNDLE ...` and add pretrained.bundle=BUNDLE, or "
          f"add pretrained.allow_random=True to train with random stand-ins")
    lines.append("no pretrained.bundle (pretrained.allow_random): random ArcFace, 3DMM "
                 "regressor and LPIPS, a synthetic BFM and a fresh decoder; the identity and "
                 "geometry losses mean nothing")
  if data.source == "demo":
    if not data.allow_demo:
      raise MissingPretrained(
          f"config '{config.variant}' trains on real faces and data.source is the bundled demo "
          f"set (100 thumbnails): set data.source to an image folder, arrayrecord:GLOB "
          f"(g2face prepare-data) or tfds:NAME, or add data.allow_demo=True")
    lines.append("data: the bundled demo faces (data.allow_demo), for trying the code only")
  return lines


def is_g2face_start(b: bundle.Bundle) -> bool:
  """Whether the bundle's generator is a whole G2Face model (else a StyleGAN2 start)."""
  return "style_mapper" in b.variables


def start_networks(b: bundle.Bundle) -> tuple[str, ...]:
  """The networks the start reads from the bundle."""
  if is_g2face_start(b):
    return state_lib.GENERATOR_NETS + ("discriminator",)
  return ("decoder",) + (("discriminator",) if "discriminator" in b.variables else ())


def open_bundle(config: ml_collections.ConfigDict) -> bundle.Bundle | None:
  """The bundle of `config.pretrained.bundle` checked against the run (None when empty).

  A one-line BundleError when it lacks a part the config asks for (the frozen networks
  and the BFM; the decoder with `pretrained.start`) or holds a network of other shapes
  than `config.model` builds.
  """
  p = config.pretrained
  if not p.bundle:
    return None
  b = bundle.load(p.bundle)
  needed = FROZEN_NETS + (("decoder",) if p.start else ())
  b.require(*needed, "bfm", purpose=PURPOSE)
  b.check_fits(config.model, *FROZEN_NETS, *(start_networks(b) if p.start else ()),
               purpose=PURPOSE)
  return b


def describe_start(b: bundle.Bundle) -> str:
  if is_g2face_start(b):
    return f"the G2Face model of {b.path}"
  extra = " and its discriminator" if "discriminator" in b.variables else ""
  return f"the StyleGAN2 synthesis layers of {b.path}{extra}"


def start_variables(b: bundle.Bundle, params: dict, batch_stats: dict,
                    disc_params: dict) -> tuple[dict, dict, dict]:
  """Host (NumPy) trees of a fresh state -> the same trees with the start applied
  (params {GENERATOR_NETS: ...}, batch_stats {BATCH_STAT_NETS: ...}, disc_params)."""
  params, batch_stats = dict(params), dict(batch_stats)
  if "discriminator" in b.variables:
    disc_params = b.variables["discriminator"]["params"]
  if is_g2face_start(b):
    for name in state_lib.GENERATOR_NETS:
      params[name] = b.variables[name]["params"]
      if name in batch_stats:
        batch_stats[name] = b.variables[name]["batch_stats"]
    return params, batch_stats, disc_params
  labels = state_lib.generator_labels({"decoder": params["decoder"]})["decoder"]
  params["decoder"] = jax.tree.map(lambda label, fresh, loaded: loaded if label == "pretrained"
                                   else fresh, labels, params["decoder"],
                                   b.variables["decoder"]["params"])
  return params, batch_stats, disc_params


def start_state(state: state_lib.TrainState, b: bundle.Bundle,
                state_sharding: Any) -> state_lib.TrainState:
  """A fresh (sharded) train state with the bundle's start applied, in `state_sharding`.
  The optimizer states are left as initialised (Adam's moments start at zero either way)."""
  names = start_networks(b)
  host = jax.device_get(({n: state.params[n] for n in names if n in state.params},
                         {n: state.batch_stats[n] for n in names if n in state.batch_stats},
                         state.disc_params))
  params, batch_stats, disc_params = start_variables(b, *host)
  put = lambda tree, sh: jax.device_put(tree, sh)  # noqa: E731
  return state.replace(
      params={**state.params, **{n: put(v, state_sharding.params[n]) for n, v in params.items()}},
      batch_stats={**state.batch_stats, **{n: put(v, state_sharding.batch_stats[n])
                                            for n, v in batch_stats.items()}},
      disc_params=put(disc_params, state_sharding.disc_params))
