"""Networks built from a config's `model` section (the one place that reads it)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from g2face_jax.nn import arcface, decoder, extractor, face3d, lpips, mapping, stylegan


def build_decoder(model: ml_collections.ConfigDict) -> decoder.Decoder:
  return decoder.Decoder(model.size, tuple(model.channels), blur_taps=tuple(model.blur_taps))


def build_discriminator(model: ml_collections.ConfigDict) -> stylegan.Discriminator:
  return stylegan.Discriminator(model.size, tuple(model.channels),
                                blur_taps=tuple(model.blur_taps))


def style_repeats(size: int) -> tuple[int, int, int]:
  """How many styles the low, middle and high heads feed: (6, 6, 2) at 256.

  Low and middle split the decoder's styles before the last two evenly; the
  high head feeds the last two (the final resolution's conv and ToRGB).
  """
  n = decoder.num_styles(size)
  low = (n - 2 + 1) // 2
  return (low, n - 2 - low, 2)


def build_style_mapper(model: ml_collections.ConfigDict) -> mapping.StyleMapper:
  return mapping.StyleMapper(style_dim=model.style_dim, n_mlp=model.mapper_layers,
                             repeats=style_repeats(model.size))


def build_map_2_id(model: ml_collections.ConfigDict) -> mapping.Map2ID:
  return mapping.Map2ID(features=model.identity_dim)


def build_extractor(model: ml_collections.ConfigDict) -> extractor.PasswordExtractor:
  return extractor.PasswordExtractor(image_size=model.size)


def build_arcface(model: ml_collections.ConfigDict) -> arcface.IResNet:
  return arcface.IResNet(layers=tuple(model.arcface_layers))


def build_recon_net(model: ml_collections.ConfigDict) -> face3d.ReconNet:
  # bundles written before `recon_layers` existed hold the official ResNet-50
  return face3d.ReconNet(layers=tuple(model.get("recon_layers", face3d.RESNET50)))


def build_lpips(model: ml_collections.ConfigDict) -> lpips.LPIPS:
  del model
  return lpips.LPIPS()


NETWORKS = ("decoder", "discriminator", "style_mapper", "map_2_id", "extractor", "arcface",
            "recon_net", "lpips")


# What the inference pipeline runs, and what training adds (the discriminator and LPIPS).
INFERENCE_NETWORKS = ("decoder", "style_mapper", "map_2_id", "extractor", "arcface", "recon_net")
TRAINING_NETWORKS = INFERENCE_NETWORKS + ("discriminator", "lpips")


@dataclasses.dataclass(frozen=True)
class Networks:
  """The Flax modules a config builds, one field per network of NETWORKS; a field is None
  when the network was not built (the pipeline builds INFERENCE_NETWORKS, training
  TRAINING_NETWORKS). Hashable: a static argument of jitted functions."""
  decoder: Any = None
  style_mapper: Any = None
  map_2_id: Any = None
  extractor: Any = None
  arcface: Any = None
  recon_net: Any = None
  discriminator: Any = None
  lpips: Any = None

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict,
                  names: Sequence[str] = INFERENCE_NETWORKS) -> "Networks":
    """The named networks of `model` (default: the inference pipeline's)."""
    return cls(**{name: build(model, name) for name in names})

  @property
  def names(self) -> tuple[str, ...]:
    """The networks built, in field order."""
    return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

  def map(self, fn: Callable[[Any], Any]) -> "Networks":
    """`fn` applied to every built network (None fields stay None)."""
    return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in self.names})


def build(model: ml_collections.ConfigDict, name: str):
  """The Flax module of network `name` (one of NETWORKS)."""
  builders = dict(decoder=build_decoder, discriminator=build_discriminator,
                  style_mapper=build_style_mapper, map_2_id=build_map_2_id,
                  extractor=build_extractor, arcface=build_arcface, recon_net=build_recon_net,
                  lpips=build_lpips)
  if name not in builders:
    raise ValueError(f"unknown network '{name}'; known: {', '.join(NETWORKS)}")
  return builders[name](model)


def example_inputs(model: ml_collections.ConfigDict, name: str, batch: int = 1) -> tuple:
  """Zero arrays of the shapes network `name` is called with (for init and eval_shape)."""
  s = model.size
  image = np.zeros((batch, s, s, 3), np.float32)
  if name == "decoder":
    return (image, np.zeros((batch, decoder.num_styles(s), model.style_dim), np.float32),
            np.zeros((batch,) + decoder.BITS_SHAPE, np.float32),
            [np.zeros(shape, np.float32) for shape in decoder.noise_shapes(s, batch)])
  if name == "style_mapper":
    return (np.zeros((batch, model.identity_dim), np.float32),
            np.zeros((batch, model.geometry_dim), np.float32))
  if name == "map_2_id":
    return (np.zeros((max(batch, 2), model.identity_dim), np.float32),)
  if name == "lpips":
    return (image, image)
  return (image,)


def abstract_variables(model: ml_collections.ConfigDict, name: str) -> dict:
  """Shapes and dtypes (ShapeDtypeStruct tree) of network `name`'s variables; nothing materialised."""
  module = build(model, name)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs(model, name)))


def init_variables(model: ml_collections.ConfigDict, rng: jax.Array,
                   names: Sequence[str] = NETWORKS) -> dict[str, dict]:
  """Fresh variables {name: {'params': ..., ['batch_stats': ...]}} of the named networks."""
  return {name: build(model, name).init(key, *example_inputs(model, name))
          for name, key in zip(names, jax.random.split(rng, len(names)))}
