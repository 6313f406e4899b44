"""The files a user brings -> Flax variables, one function per kind of file.

Each `convert_*` takes the loaded content of one file (dicts of NumPy arrays,
as `checkpoint_io.load_state_file` or `recipe.regenerate` give them) and the
model config, checks that the content is the kind it expects (a one-line
ConversionError says what was expected and what was found), and returns
{network name: variables} in the names of `models.NETWORKS`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from g2face_jax import models
from g2face_jax.convert import arcface, face3d, lpips, mapping, stylegan
from g2face_jax.convert.table import ConversionError

# official entry of G2Face.pth -> (our network, converter)
G2FACE_PARTS = {
    "anonymous_net": ("decoder", stylegan.convert_decoder),
    "style_mlp": ("style_mapper", mapping.convert_style_mlp),
    "map_2_id": ("map_2_id", mapping.convert_map_2_id),
    "hiding_extractor": ("extractor", mapping.convert_hiding_extractor),
    "discriminator": ("discriminator", stylegan.convert_discriminator),
}

# What each kind of file looks like: keys that identify it.
_SIGNATURES = (
    ("a G2Face checkpoint (G2Face.pth)", lambda d: "anonymous_net" in d),
    ("a rosinality StyleGAN2 checkpoint (550000.pt)", lambda d: "g_ema" in d),
    ("a Deep3DFaceRecon checkpoint (epoch_20.pth)", lambda d: "net_recon" in d),
    ("an ArcFace iresnet state dict (ms1mv3_arcface_r50.pth)",
     lambda d: "prelu.weight" in d and "fc.weight" in d),
    ("a torchvision vgg16 state dict", lambda d: "features.0.weight" in d and "features.28.weight" in d),
    ("LPIPS linear heads (lpips v0.1 vgg.pth)", lambda d: "lin0.model.1.weight" in d),
)
G2FACE, STYLEGAN2, D3DFR, ARCFACE, VGG16, LPIPS_HEADS = (name for name, _ in _SIGNATURES)


def describe(content: Any) -> str:
  """What a loaded file looks like, in words (for error messages)."""
  if not isinstance(content, Mapping):
    return f"a {type(content).__name__}, not a dict of weights"
  for name, matches in _SIGNATURES:
    if matches(content):
      return name
  keys = list(content)[:3]
  return f"an unknown dict (keys {keys}{' ...' if len(content) > 3 else ''})"


def expect(content: Any, kind: str, source: str | os.PathLike) -> Mapping[str, Any]:
  """`content` if it is of `kind` (one of the names above), else a one-line ConversionError."""
  found = describe(content)
  if found != kind:
    raise ConversionError(f"{os.fspath(source)}: expected {kind}, found {found}")
  return content


def convert_g2face(content: Mapping[str, Any], model: ml_collections.ConfigDict,
                   source: str = "G2Face.pth") -> dict[str, dict]:
  """G2Face.pth -> decoder, style_mapper, map_2_id, extractor, discriminator variables.

  Training copies also hold epoch / iter / optimizer / optimizer_D / scheduler,
  which inference does not use.
  """
  expect(content, G2FACE, source)
  missing = [k for k in G2FACE_PARTS if k not in content]
  if missing:
    raise ConversionError(f"{source}: G2Face checkpoint without {missing}")
  out = {}
  for entry, (name, convert) in G2FACE_PARTS.items():
    try:
      out[name] = convert(content[entry], models.abstract_variables(model, name))
    except ConversionError as e:
      raise ConversionError(f"{source}: {e}") from None
  return out


def convert_stylegan2(content: Mapping[str, Any], model: ml_collections.ConfigDict,
                      decoder_variables: Mapping[str, Any], load_discriminator: bool = False,
                      source: str = "550000.pt") -> dict[str, dict]:
  """rosinality checkpoint -> the decoder with `g_ema`'s synthesis layers loaded
  over `decoder_variables` (the official non-strict load), and with
  `load_discriminator` the discriminator from `d` (an option; the official
  training starts the discriminator from scratch)."""
  expect(content, STYLEGAN2, source)
  try:
    out = {"decoder": stylegan.stylegan2_into_decoder(content["g_ema"], decoder_variables,
                                                      tuple(model.blur_taps))}
    if load_discriminator:
      out["discriminator"] = stylegan.convert_discriminator(
          content["d"], models.abstract_variables(model, "discriminator"),
          tuple(model.blur_taps), what="StyleGAN2 d")
  except ConversionError as e:
    raise ConversionError(f"{source}: {e}") from None
  return out


def _single(kind: str, name: str, convert):
  def run(content: Mapping[str, Any], model: ml_collections.ConfigDict, source: str) -> dict:
    expect(content, kind, source)
    try:
      return {name: convert(content, models.abstract_variables(model, name))}
    except ConversionError as e:
      raise ConversionError(f"{source}: {e}") from None
  run.__doc__ = f"{kind} -> {{'{name}': variables}}."
  return run


convert_arcface = _single(ARCFACE, "arcface", arcface.convert_arcface)
convert_d3dfr = _single(D3DFR, "recon_net", face3d.convert_recon_net)


def convert_lpips(vgg16: Mapping[str, Any], heads: Mapping[str, Any], vgg16_source: str,
                  heads_source: str) -> dict[str, dict]:
  """torchvision vgg16 state dict + lpips `vgg.pth` heads -> {'lpips': {'params': ...}}."""
  expect(vgg16, VGG16, vgg16_source)
  expect(heads, LPIPS_HEADS, heads_source)
  try:
    return {"lpips": {"params": lpips.convert_lpips(vgg16, heads)}}
  except ConversionError as e:
    raise ConversionError(f"{vgg16_source} + {heads_source}: {e}") from None
