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
from g2face_jax.convert import bfm as convert_bfm
from g2face_jax.convert import recipe, sources
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


def generator_noise(fixture, prefix: str = "noise") -> list[np.ndarray]:
  """A fixture's per-layer generator noise `<prefix>/<layer>.noise`, NHWC, in the
  decoder's order."""
  n_convs = sum(k.startswith(f"{prefix}/convs.") for k in fixture)
  names = ["conv1"] + [f"convs.{j}" for j in range(n_convs)]
  return [nhwc(fixture[f"{prefix}/{n}.noise"]) for n in names]


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


def recipe_g2face(folder: str) -> dict[str, dict[str, np.ndarray]]:
  """The folder's recipe weights laid out as the official `G2Face.pth`."""
  return {entry: _weights(folder, recipe_name) for entry, recipe_name in (
      ("anonymous_net", "generator"), ("style_mlp", "style_mlp"), ("map_2_id", "map_2_id"),
      ("hiding_extractor", "hiding_extractor"), ("discriminator", "discriminator"))}


def recipe_sources(folder: str) -> dict[str, dict]:
  """The folder's recipe weights of every official `.pth` the pipeline needs, in the
  official file layouts: {'g2face': G2Face.pth, 'arcface': ms1mv3_arcface_r50.pth,
  'd3dfr': epoch_20.pth}."""
  return {"g2face": recipe_g2face(folder), "arcface": _weights(folder, "arcface_r50"),
          "d3dfr": {"net_recon": _weights(folder, "d3dfr_r50")}}


def convert_sources(content: dict[str, dict], model) -> dict[str, dict]:
  """`recipe_sources`-like content -> {network: variables}, through the file converters."""
  variables = sources.convert_g2face(content["g2face"], model)
  variables.update(sources.convert_arcface(content["arcface"], model, "arcface"))
  variables.update(sources.convert_d3dfr(content["d3dfr"], model, "d3dfr"))
  return variables


def with_fixture_batch_stats(nets: models.Networks, variables: dict, folder: str) -> dict:
  """The BatchNorm running statistics the pipeline fixture was computed with.

  The fixture script ran map_2_id and hiding_extractor in training mode on their
  own fixtures' inputs (`out_train`) before the pipeline, on the same modules,
  so PyTorch had already moved their running statistics one step (momentum 0.1,
  unbiased batch variance). The same update is done here.
  """
  out = dict(variables)
  for name, fixture, x in (("map_2_id", "map_2_id", lambda f: f["z"]),
                           ("extractor", "hiding_extractor", lambda f: nhwc(f["x"]))):
    module = getattr(nets, name)
    _, state = module.apply(variables[name], x(_load(folder, fixture)), train=True,
                            mutable=["batch_stats"])
    out[name] = {**variables[name], "batch_stats": state["batch_stats"]}
  return out


@functools.lru_cache(maxsize=2)
def official_variables(folder: str) -> tuple[models.Networks, dict]:
  """The paper-config pipeline networks with the folder's recipe weights (as converted
  from the official files; BatchNorm statistics as stored in the recipe)."""
  model = config_lib.load("paper").model
  return models.Networks.from_config(model), convert_sources(recipe_sources(folder), model)


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


DECISIVE_LOGIT = 1e-3  # extracted bits are compared where |official logit| exceeds this


def compare_pipeline(nets: models.Networks, variables: dict, folder: str) -> dict[str, float]:
  """Errors of every pipeline stage against the folder's pipeline fixture.

  `variables` as converted from the official files; the fixture script's
  BatchNorm state is applied here (`with_fixture_batch_stats`).

  Two stages are discontinuous in their input, so the fixture's own values
  bridge them: the hidden bits are the IEEE bits of ArcFace(x), and the ~1e-6
  float difference of any two ArcFace implementations flips low mantissa bits,
  which the recipe-weight decoder does not ignore; so the anonymize pass hides
  the fixture's `hide_bits` (and the codec is checked on the fixture's
  `arc_id`). Extracted bits whose official logit lies within float noise of 0
  are taken from the fixture. Stages 7-8 run from the fixture's own `anon` /
  `extracted_id` and end to end from our `anon`.
  """
  fx = _load(folder, "pipeline")
  variables = with_fixture_batch_stats(nets, variables, folder)
  stages = pipeline.Stages(nets, variables)
  noise = pipeline_noise(folder)
  x, hide_bits, ref_logits = nhwc(fx["x"]), fx["hide_bits"], fx["logits"]
  decisive = np.abs(ref_logits) > DECISIVE_LOGIT

  errs = {}
  analyzed = stages.analyze(x)
  errs["arc_id"] = rel_err(analyzed["arc_id"], fx["arc_id"])
  errs["coeff"] = rel_err(analyzed["coeff"], fx["coeff"])
  errs["hide_bits (share wrong)"] = float(np.mean(
      np.asarray(payload.float_to_bits(fx["arc_id"])) != hide_bits))
  anon = stages.anonymize(x, analyzed["coeff"], fx["z"], hide_bits, noise)["anon"]
  errs["anon"] = rel_err(nchw(anon), fx["anon"])

  def extract(image):
    out = stages.extract_identity(image)
    bits = np.where(decisive, np.asarray(out["bits"]), ref_logits > 0)
    wrong = float(np.mean(np.asarray(out["bits"])[decisive] != (ref_logits[decisive] > 0)))
    return out["logits"], payload.decode_identity(bits), wrong

  logits, extracted_id, wrong = extract(nhwc(fx["anon"]))
  errs["logits"] = rel_err(logits, ref_logits)
  errs["bits (share wrong)"] = wrong
  errs["extracted_id"] = rel_err(extracted_id, fx["extracted_id"])
  restored = stages.restore(nhwc(fx["anon"]), fx["extracted_id"], hide_bits, noise)
  errs["coeff_anon"] = rel_err(restored["coeff_anon"], fx["coeff_anon"])
  errs["recovered"] = rel_err(nchw(restored["recovered"]), fx["recovered"])

  logits, extracted_id, wrong = extract(anon)
  errs["logits (end to end)"] = rel_err(logits, ref_logits)
  errs["bits (end to end, share wrong)"] = wrong
  errs["extracted_id (end to end)"] = rel_err(extracted_id, fx["extracted_id"])
  end = stages.restore(anon, extracted_id, hide_bits, noise)
  errs["recovered (end to end)"] = rel_err(nchw(end["recovered"]), fx["recovered"])
  return errs


def check_pipeline(folder: str) -> dict[str, float]:
  """Stage by stage (each stage from the fixture's own inputs) and end to end."""
  nets, variables = official_variables(folder)
  return compare_pipeline(nets, variables, folder)


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


def run(folder: str, names=None, report=print, checks=CHECKS,
        on_request=()) -> dict[str, dict[str, float]]:
  """Run the named `checks` (all but those `on_request` by default) and report one line
  per output. A check returns {output: error} (tolerance TOLERANCE) or {output: (error,
  tolerance)}. Returns {check: {output: (error, tolerance)}}."""
  jax.config.update("jax_default_matmul_precision", "highest")
  results = {}
  for name in names or [n for n in checks if n not in on_request]:
    results[name] = {key: value if isinstance(value, tuple) else (value, TOLERANCE)
                     for key, value in checks[name](folder).items()}
    for key, (err, tolerance) in results[name].items():
      status = "ok" if err <= tolerance else "FAIL"
      stated = "" if tolerance == TOLERANCE else f" (tolerance {tolerance:.0e})"
      report(f"{name:16s} {key:32s} {err:.2e}  {status}{stated}")
  return results


def failures(results: dict) -> list[str]:
  """'check/output' of every result of `run` outside its tolerance."""
  return [f"{name}/{key}" for name, r in results.items() for key, (err, tol) in r.items()
          if not err <= tol]
