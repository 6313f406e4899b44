"""G2Face configurations: `get_config("paper")` is the official 256 model.

Variants (pick with `configs/g2face.py:VARIANT[,key=value...]`):
  paper  official 256x256 G2Face (rosinality config-f widths, 512-d styles)
  smoke  64x64, narrow: a quick end-to-end run on CPU
  tiny   32x32, very narrow: unit tests and notebooks in CI
Overrides after the variant set top-level-or-dotted fields, e.g.
`configs/g2face.py:paper,model.size=128`.
"""
from __future__ import annotations

import ml_collections

PAPER_CHANNELS = (512, 512, 512, 512, 512, 256, 128)  # resolutions 4 .. 256


def _model(size: int, channels: tuple[int, ...], style_dim: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      size=size,                 # output (and input) resolution
      channels=channels,         # decoder/discriminator width at 4, 8, ..., size
      style_dim=style_dim,       # width of each style vector
      blur_taps=(1, 3, 3, 1),    # StyleGAN2 FIR filter
      identity_dim=512,          # ArcFace embedding = 512 float32 hidden values
      geometry_dim=147,          # 3DMM id 80 + exp 64 + angles 3
      mapper_layers=4,           # equalized linears per style-mapper head
      arcface_layers=(3, 4, 14, 3),  # iresnet50; (3, 13, 30, 3) for iresnet100
  ))


def _variant(name: str) -> ml_collections.ConfigDict:
  if name == "paper":
    model = _model(256, PAPER_CHANNELS, 512)
  elif name == "smoke":
    model = _model(64, (64, 64, 64, 32, 16), 64)
  elif name == "tiny":
    model = _model(32, (32, 32, 16, 16), 32)
  else:
    raise ValueError(f"unknown config variant '{name}' (paper, smoke, tiny)")
  return ml_collections.ConfigDict(dict(variant=name, model=model))


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  return text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'VARIANT[,key=value,...]' (default 'paper'). Returns a locked config."""
  parts = [p for p in (arg or "paper").split(",") if p]
  config = _variant(parts[0])
  for part in parts[1:]:
    if "=" not in part:
      raise ValueError(f"config override '{part}' must be key=value")
    key, value = part.split("=", 1)
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"config has no field '{key}'")
    node[leaf] = _parse_value(value)
  config.lock()
  return config
