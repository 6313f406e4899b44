"""`g2face convert`: the official files a user brings -> one bundle folder."""
from __future__ import annotations

import os
from typing import Callable

import jax
import ml_collections

from g2face_jax import bundle, models
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert import checkpoint_io, sources
from g2face_jax.convert import inception as convert_inception
from g2face_jax.convert.table import ConversionError


def build_bundle(out_dir: str, config: ml_collections.ConfigDict, *, g2face: str | None = None,
                 arcface: str | None = None, d3dfr: str | None = None, bfm: str | None = None,
                 lpips_vgg16: str | None = None, lpips_heads: str | None = None,
                 stylegan: str | None = None, stylegan_discriminator: bool = False,
                 inception: str | None = None, seed: int = 0,
                 report: Callable[[str], None] = print) -> str:
  """Convert every given file and write one bundle; returns its path.

  Any subset may be given. `stylegan` (rosinality 550000.pt) starts a training
  run: its `g_ema` synthesis layers go into a freshly initialised decoder
  (seeded by `seed`; a training run keeps only the synthesis layers, see
  `train.pretrained`), and with `stylegan_discriminator` its `d` becomes the
  discriminator; it cannot be combined with `g2face`, whose decoder is trained.
  A training start needs stylegan, arcface, d3dfr, lpips_vgg16 + lpips_heads and bfm.
  `inception` (pytorch-fid's FID InceptionV3) is stored as network 'inception'
  for `g2face eval --fid-bundle`; it does not depend on the model config.
  """
  model = config.model
  if stylegan and g2face:
    raise ConversionError("--stylegan starts training from the pretrained StyleGAN2; "
                          "it cannot be combined with --g2face (a trained decoder)")
  if (lpips_vgg16 is None) != (lpips_heads is None):
    raise ConversionError("LPIPS needs both --lpips-vgg16 and --lpips-heads")
  given = {k: p for k, p in dict(g2face=g2face, arcface=arcface, d3dfr=d3dfr, bfm=bfm,
                                 lpips_vgg16=lpips_vgg16, lpips_heads=lpips_heads,
                                 stylegan=stylegan, inception=inception).items() if p}
  for path in given.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: file not found")

  def read(name: str):
    report(f"reading {given[name]}")
    return checkpoint_io.load_state_file(given[name])

  variables = {}
  if g2face:
    variables.update(sources.convert_g2face(read("g2face"), model, g2face))
  if arcface:
    variables.update(sources.convert_arcface(read("arcface"), model, arcface))
  if d3dfr:
    variables.update(sources.convert_d3dfr(read("d3dfr"), model, d3dfr))
  if lpips_vgg16:
    variables.update(sources.convert_lpips(read("lpips_vgg16"), read("lpips_heads"),
                                           lpips_vgg16, lpips_heads))
  if stylegan:
    start = models.init_variables(model, jax.random.key(seed), ["decoder"])["decoder"]
    variables.update(sources.convert_stylegan2(read("stylegan"), model, start,
                                               stylegan_discriminator, stylegan))
  if inception:
    variables["inception"] = convert_inception.convert_inception(read("inception"), inception)
  face_model = None
  if bfm:
    report(f"reading {bfm}")
    face_model = convert_bfm.load_mat(bfm)
  path = bundle.save(out_dir, config, variables, bfm=face_model, sources=given)
  report(f"bundle written to {path}: {', '.join(sorted(variables) + (['bfm'] if bfm else []))}")
  return path
