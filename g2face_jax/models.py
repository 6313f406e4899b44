"""Networks built from a config's `model` section (the one place that reads it)."""
from __future__ import annotations

import ml_collections

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
  del model  # one architecture (ResNet-50)
  return face3d.ReconNet()


def build_lpips(model: ml_collections.ConfigDict) -> lpips.LPIPS:
  del model
  return lpips.LPIPS()
