"""Official-parity checks: regenerate a fixture folder's recipe weights, convert
them, run our networks on the fixture inputs and measure the relative error
`max|ours - ref| / max|ref|` of every output (the fixtures' README).

A fixture folder is `../shared/parity/official-seedN` or a copy of it.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import numpy as np

from g2face_jax import config as config_lib
from g2face_jax import models, payload, pipeline
from g2face_jax.convert import arcface as convert_arcface
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert import face3d as convert_face3d
from g2face_jax.convert import mapping as convert_mapping
from g2face_jax.convert import recipe
from g2face_jax.convert import stylegan as convert_stylegan
from g2face_jax.nn import bfm as bfm_lib

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


def _abstract(module, *args, **kwargs):
  return convert_stylegan.abstract(module, *args, **kwargs)


@functools.lru_cache(maxsize=2)
def official_variables(folder: str) -> tuple[pipeline.Networks, dict]:
  """The paper-config pipeline networks with the folder's recipe weights."""
  nets = pipeline.Networks.from_config(config_lib.load("paper").model)
  img = np.zeros((1, 256, 256, 3), np.float32)
  _, decoder_vars = official_decoder(folder)
  variables = {
      "decoder": decoder_vars,
      "style_mapper": convert_mapping.convert_style_mlp(
          _weights(folder, "style_mlp"),
          _abstract(nets.style_mapper, np.zeros((1, 512), np.float32), np.zeros((1, 147), np.float32))),
      "map_2_id": convert_mapping.convert_map_2_id(
          _weights(folder, "map_2_id"), _abstract(nets.map_2_id, np.zeros((2, 512), np.float32))),
      "extractor": convert_mapping.convert_hiding_extractor(
          _weights(folder, "hiding_extractor"), _abstract(nets.extractor, img)),
      "arcface": convert_arcface.convert_arcface(
          _weights(folder, "arcface_r50"), _abstract(nets.arcface, img)),
      "recon_net": convert_face3d.convert_recon_net(
          _weights(folder, "d3dfr_r50"), _abstract(nets.recon_net, img)),
  }
  return nets, variables


def check_style_mlp(folder: str) -> dict[str, float]:
  fx = _load(folder, "style_mlp")
  nets, variables = official_variables(folder)
  out = jax.jit(nets.style_mapper.apply)(variables["style_mapper"], fx["latent_id"], fx["latent_shape"])
  return {"out": rel_err(out, fx["out"])}


def _eval_and_train(module, variables, x):
  out_eval = jax.jit(lambda v, a: module.apply(v, a, train=False))(variables, x)
  out_train, _ = jax.jit(lambda v, a: module.apply(v, a, train=True, mutable=["batch_stats"]))(
      variables, x)
  return out_eval, out_train


def check_map_2_id(folder: str) -> dict[str, float]:
  fx = _load(folder, "map_2_id")
  nets, variables = official_variables(folder)
  out_eval, out_train = _eval_and_train(nets.map_2_id, variables["map_2_id"], fx["z"])
  return {"out_eval": rel_err(out_eval, fx["out_eval"]),
          "out_train": rel_err(out_train, fx["out_train"])}


def check_hiding_extractor(folder: str) -> dict[str, float]:
  fx = _load(folder, "hiding_extractor")
  nets, variables = official_variables(folder)
  out_eval, out_train = _eval_and_train(nets.extractor, variables["extractor"], nhwc(fx["x"]))
  return {"out_eval": rel_err(out_eval, fx["out_eval"]),
          "out_train": rel_err(out_train, fx["out_train"])}


def check_arcface(folder: str) -> dict[str, float]:
  fx = _load(folder, "arcface_r50")
  nets, variables = official_variables(folder)
  out = jax.jit(nets.arcface.apply)(variables["arcface"], nhwc(fx["x"]))
  return {"out": rel_err(out, fx["out"])}


def check_d3dfr(folder: str) -> dict[str, float]:
  fx = _load(folder, "d3dfr_r50")
  nets, variables = official_variables(folder)
  out = jax.jit(nets.recon_net.apply)(variables["recon_net"], nhwc(fx["x"]))
  return {"out": rel_err(out, fx["out"])}


def check_bfm_geometry(folder: str) -> dict[str, float]:
  fx = _load(folder, "bfm_geometry")
  bfm = convert_bfm.load_mat(os.path.join(folder, "bfm_small", "BFM_model_front.mat"))
  shape, landmark, color = jax.jit(bfm_lib.compute_for_loss)(bfm, fx["coeffs"])
  return {"face_shape": rel_err(shape, fx["face_shape"]),
          "landmark": rel_err(landmark, fx["landmark"]), "color": rel_err(color, fx["color"])}


def pipeline_noise(folder: str) -> list[np.ndarray]:
  """The pipeline reuses the generator fixture's noise in both decoder passes."""
  return generator_noise(_load(folder, "generator"))


def check_pipeline(folder: str) -> dict[str, float]:
  """Stage by stage (each stage from the fixture's own inputs) and end to end."""
  fx = _load(folder, "pipeline")
  nets, variables = official_variables(folder)
  noise = pipeline_noise(folder)
  x = nhwc(fx["x"])
  anon = pipeline.anonymize(nets, variables, x, fx["z"], noise)
  errs = {k: rel_err(anon[k] if k != "anon" else nchw(anon[k]), fx[k])
          for k in ("arc_id", "coeff", "hide_bits", "anon")}
  fixture_anon = nhwc(fx["anon"])
  extracted = pipeline.extract_identity(nets, variables, fixture_anon)
  errs["logits"] = rel_err(extracted["logits"], fx["logits"])
  decisive = np.abs(fx["logits"]) > 1e-3  # bits are compared where the sign is not float noise
  errs["bits (share wrong)"] = float(np.mean(
      np.asarray(extracted["bits"])[decisive] != (fx["logits"][decisive] > 0)))
  errs["extracted_id"] = rel_err(
      payload.decode_identity(payload.bits_from_logits(fx["logits"])), fx["extracted_id"])
  restored = pipeline.restore(nets, variables, fixture_anon, fx["extracted_id"], fx["hide_bits"], noise)
  errs["coeff_anon"] = rel_err(restored["coeff_anon"], fx["coeff_anon"])
  errs["recovered"] = rel_err(nchw(restored["recovered"]), fx["recovered"])
  end = pipeline.recover(nets, variables, anon["anon"], anon["hide_bits"], noise)
  errs["recovered (end to end)"] = rel_err(nchw(end["recovered"]), fx["recovered"])
  return errs


CHECKS: dict[str, Callable[[str], dict[str, float]]] = {
    "generator": check_generator,
    "discriminator": check_discriminator,
    "bit_codec": check_bit_codec,
    "style_mlp": check_style_mlp,
    "map_2_id": check_map_2_id,
    "hiding_extractor": check_hiding_extractor,
    "arcface_r50": check_arcface,
    "d3dfr_r50": check_d3dfr,
    "bfm_geometry": check_bfm_geometry,
    "pipeline": check_pipeline,
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
