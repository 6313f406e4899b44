"""Networks built from a config's `model` section (one place that reads the config)."""
from __future__ import annotations

import ml_collections

from g2face_jax.nn import decoder, stylegan


def build_decoder(model: ml_collections.ConfigDict) -> decoder.Decoder:
  return decoder.Decoder(model.size, tuple(model.channels), blur_taps=tuple(model.blur_taps))


def build_discriminator(model: ml_collections.ConfigDict) -> stylegan.Discriminator:
  return stylegan.Discriminator(model.size, tuple(model.channels),
                                blur_taps=tuple(model.blur_taps))
