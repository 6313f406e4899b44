"""Official-parity checks: regenerate a fixture folder's recipe weights, convert
them, run our networks on the fixture inputs and measure the relative error
`max|ours - ref| / max|ref|` of every output (the fixtures' README).

A fixture folder is `../shared/parity/official-seedN` or a copy of it.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np

from g2face_jax import config as config_lib
from g2face_jax import models, payload
from g2face_jax.convert import recipe
from g2face_jax.convert import stylegan as convert_stylegan
from g2face_jax.nn import decoder as decoder_lib

TOLERANCE = 1e-4


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f"shape {ours.shape} != reference {ref.shape}")
  return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def nhwc(a) -> np.ndarray:
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


def nchw(a) -> np.ndarray:
  return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _weights(folder: str, name: str) -> dict[str, np.ndarray]:
  return recipe.regenerate(os.path.join(folder, f"{name}.weights.json"), recipe.seed_of(folder))


def _load(folder: str, name: str):
  return np.load(os.path.join(folder, f"{name}.npz"))


def generator_noise(fixture) -> list[np.ndarray]:
  """The generator fixture's per-layer noise, NHWC, in the decoder's order."""
  n_convs = sum(k.startswith("noise/convs.") for k in fixture.files)
  names = ["conv1"] + [f"convs.{j}" for j in range(n_convs)]
  return [nhwc(fixture[f"noise/{n}.noise"]) for n in names]


def official_decoder(folder: str):
  """(Decoder, variables) of the paper config with the folder's generator recipe weights."""
  model = models.build_decoder(config_lib.load("paper").model)
  fx = _load(folder, "generator")
  x = nhwc(fx["x"])
  abstract = convert_stylegan.abstract(model, x, fx["styles"], fx["bits"], generator_noise(fx))
  return model, convert_stylegan.convert_decoder(_weights(folder, "generator"), abstract)


def check_generator(folder: str) -> dict[str, float]:
  fx = _load(folder, "generator")
  model, variables = official_decoder(folder)
  out = jax.jit(model.apply)(variables, nhwc(fx["x"]), fx["styles"], fx["bits"],
                             generator_noise(fx))
  return {"out": rel_err(nchw(out), fx["out"])}


def check_discriminator(folder: str) -> dict[str, float]:
  fx = _load(folder, "discriminator")
  model = models.build_discriminator(config_lib.load("paper").model)
  x = nhwc(fx["x"])
  variables = convert_stylegan.convert_discriminator(
      _weights(folder, "discriminator"), convert_stylegan.abstract(model, x))
  out = jax.jit(model.apply)(variables, x)
  return {"out": rel_err(out, fx["out"])}


def check_bit_codec(folder: str) -> dict[str, float]:
  fx = _load(folder, "bit_codec")
  bits = payload.float_to_bits(fx["floats"])
  back = payload.bits_to_float(fx["bits"])
  return {"bits": float(np.mean(np.asarray(bits) != fx["bits"])), "back": rel_err(back, fx["back"])}


CHECKS: dict[str, Callable[[str], dict[str, float]]] = {
    "generator": check_generator,
    "discriminator": check_discriminator,
    "bit_codec": check_bit_codec,
}


def run(folder: str, names=None, report=print) -> dict[str, dict[str, float]]:
  """Run the named checks (all by default) and report one line per output."""
  jax.config.update("jax_default_matmul_precision", "highest")
  results = {}
  for name in names or CHECKS:
    results[name] = CHECKS[name](folder)
    for key, err in results[name].items():
      status = "ok" if err <= TOLERANCE else "FAIL"
      report(f"{name:16s} {key:20s} rel err {err:.2e}  {status}")
  return results
