"""`g2face eval`: the paper's metrics on a folder of face images, as a report.

Every image is taken as one aligned face crop (`read_face`: `images.read` and
`images.resize` to the model size, as `--aligned` photos and training read it)
and goes through what a user gets: `photo.Anonymizer` with the key (anonymize,
write as uint8, recover), plus the wrong-key recovery. Metrics:
  anonymization  ArcFace cosine original vs anonymized; top-1/5 retrieval of
                 the anonymized faces among the originals; the independent
                 recognizer's match rate (dlib, distance < 0.6)
  utility        pose (degrees) and expression errors of the 3DMM coefficients,
                 landmark error (when the bundle has the BFM), face detection rate
  recovery       PSNR, SSIM, MAE, LPIPS (when the bundle has it), ArcFace cosine
                 original vs recovered; bit error rate of the official code on the
                 float crop, after uint8 (PNG) and after JPEG q90 / q75
  keys           same person (the mirrored photo) under one key: virtual
                 identity consistency; under two keys: separation; wrong-key
                 recovery rejected (secure codec) or its identity cosine
  image quality  FID of the anonymized and of the recovered faces against the
                 originals (pytorch-fid's InceptionV3, from a bundle: `--fid-bundle`)
Outputs: metrics.json, report.md, grid.png (original | anonymized | recovered | wrong key).
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from g2face_jax import faces, files, images, photo
from g2face_jax.eval import fid, metrics, recognizer
from g2face_jax.nn import bfm as bfm_lib
from g2face_jax.nn import face3d
from g2face_jax.privacy import keys

JPEG_QUALITIES = (90, 75)
FID_SKIPPED = ("skipped: pass --fid-bundle, a bundle of `g2face convert --inception "
               "pt_inception-2015-12-05-6726825d.pth`, to compute FID")
FID_SETS = ("original", "anonymized", "recovered")


def read_face(path: str, size: int) -> np.ndarray:
  """The image at `path` as one aligned face: (size, size, 3) uint8 (ImageError naming it)."""
  return images.resize(images.read(path), size)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """(H, W, 3) uint8 through JPEG at `quality` and back."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return images.decode(buffer.getvalue(), f"JPEG q{quality}")


class Evaluation:
  """Accumulates per-image measurements; `summary()` gives means and counts.

  inception_features: (N, S, S, 3) uint8 -> (N, 2048) FID features (e.g.
  `fid.InceptionFeatures`), or None to skip FID.
  """

  def __init__(self, tool: photo.Anonymizer, wrong_key: keys.Key, other_key: keys.Key,
               inception_features: Callable[[np.ndarray], np.ndarray] | None = None):
    self.tool = tool
    self.wrong = photo.Anonymizer(tool.bundle, wrong_key, identity=tool.identity,
                                  codec=tool.codec, layout=tool.layout)
    self.other = photo.Anonymizer(tool.bundle, other_key, identity=tool.identity,
                                  codec=tool.codec, layout=tool.layout)
    # hides the official float32 bits, for the bit error rates of the channel itself
    self.official = photo.Anonymizer(tool.bundle, other_key, identity="random", codec="official")
    self.values: dict[str, list[float]] = {}
    self.ids = {"original": [], "anonymized": []}
    self.failures: list[str] = []
    self.grid_rows: list[np.ndarray] = []
    self.inception_features = inception_features
    self.fid_features: dict[str, list[np.ndarray]] = {name: [] for name in FID_SETS}

  def _add(self, name: str, value) -> None:
    self.values.setdefault(name, []).extend(np.ravel(np.asarray(value, np.float64)).tolist())

  def _analyze(self, image: np.ndarray) -> dict:
    out = self.tool.stages.analyze(images.to_unit(image)[None])
    return {k: np.asarray(v) for k, v in out.items()}

  def _bit_error_rates(self, crop: np.ndarray, arc_id: np.ndarray, context: bytes) -> None:
    """BER of the official float32 code: hidden bits vs extracted, through storage.

    crop (S, S, 3) in [-1, 1]; arc_id (1, 512) its identity; context names the face."""
    z, bits, noise = self.official.face_code(arc_id[0], context)
    anon = self.official.anonymize_crops(crop[None], z, bits, noise)
    stored = {"float": anon, "png": images.to_unit(images.to_uint8(anon[0]))[None]}
    for q in JPEG_QUALITIES:
      stored[f"jpeg{q}"] = images.to_unit(_jpeg(images.to_uint8(anon[0]), q))[None]
    for name, image in stored.items():
      extracted = self.official.stages.extract_identity(image)["bits"]
      self._add(f"bit_error_rate_{name}", metrics.bit_error_rate(extracted, bits))

  def add(self, name: str, image: np.ndarray) -> None:
    """One (S, S, 3) uint8 aligned face."""
    tool = self.tool
    anon, stamp = tool.anonymize_image(image, aligned=True)
    orig, anon_a = self._analyze(image), self._analyze(anon)
    self.ids["original"].append(orig["arc_id"][0])
    self.ids["anonymized"].append(anon_a["arc_id"][0])
    self._add("id_cosine_anonymized", metrics.cosine(orig["arc_id"], anon_a["arc_id"]))
    c_orig, c_anon = face3d.split_coefficients(orig["coeff"]), face3d.split_coefficients(anon_a["coeff"])
    self._add("pose_error_deg", metrics.angle_error_degrees(c_anon["angles"], c_orig["angles"]))
    self._add("expression_error", metrics.coefficient_error(c_anon["exp"], c_orig["exp"]))
    if tool.bundle.bfm is not None:
      lm = [bfm_lib.compute_for_loss(tool.bundle.bfm, c)[1] for c in (orig["coeff"], anon_a["coeff"])]
      self._add("landmark_error_px", metrics.landmark_error(lm[1], lm[0]))
    self._add("anonymized_face_detected", float(bool(faces.detect(anon))))
    d_orig, d_anon = recognizer.descriptor(image), recognizer.descriptor(anon)
    self._add("dlib_still_matches", float(recognizer.same_person(d_orig, d_anon)[1]))

    recovered, _ = tool.recover_image(anon, stamp, aligned=True)
    x, r = images.to_unit(image)[None], images.to_unit(recovered)[None]
    self._add("psnr_db", metrics.psnr(r, x))
    self._add("ssim", metrics.ssim(r, x))
    self._add("mae", metrics.mae(r, x))
    if "lpips" in tool.bundle.variables:
      from g2face_jax import models  # built only when the bundle carries LPIPS
      self._add("lpips", models.build_lpips(tool.bundle.config.model).apply(
          tool.bundle.variables["lpips"], r, x))
    self._add("id_cosine_recovered", metrics.cosine(orig["arc_id"], self._analyze(recovered)["arc_id"]))
    self._bit_error_rates(x[0], orig["arc_id"], photo.photo_digest(image))
    self.add_fid_images(image, anon, recovered)

    mirrored = np.ascontiguousarray(image[:, ::-1])
    anon_m, _ = tool.anonymize_image(mirrored, aligned=True)
    anon_other, _ = self.other.anonymize_image(image, aligned=True)
    id_m, id_other = self._analyze(anon_m)["arc_id"], self._analyze(anon_other)["arc_id"]
    self._add("same_key_same_person_cosine", metrics.cosine(anon_a["arc_id"], id_m))
    self._add("other_key_cosine", metrics.cosine(anon_a["arc_id"], id_other))
    try:
      wrong, _ = self.wrong.recover_image(anon, stamp, aligned=True)
      self._add("wrong_key_rejected", 0.0)
      self._add("wrong_key_id_cosine", metrics.cosine(orig["arc_id"], self._analyze(wrong)["arc_id"]))
    except photo.FileError:
      self._add("wrong_key_rejected", 1.0)
      wrong = np.zeros_like(image)
    self.grid_rows.append(np.concatenate([image, anon, recovered, wrong], axis=1))

  def add_fid_images(self, original: np.ndarray, anonymized: np.ndarray,
                     recovered: np.ndarray) -> None:
    """FID features of one image's three (S, S, 3) uint8 versions (nothing without a network)."""
    if self.inception_features is not None:
      rows = self.inception_features(np.stack([original, anonymized, recovered]))
      for name, row in zip(FID_SETS, rows):
        self.fid_features[name].append(row)

  def summary(self) -> dict:
    out = {name: float(np.mean(v)) for name, v in self.values.items()}
    n = len(self.ids["original"])
    out["images"] = n
    if n:
      hits = metrics.retrieval_hits(np.stack(self.ids["anonymized"]), np.stack(self.ids["original"]),
                                    np.arange(n), ks=(1, 5))
      out.update(retrieval_top1=float(np.mean(hits[1])), retrieval_top5=float(np.mean(hits[5])))
    out["failures"] = list(self.failures)
    out.update(self._fid())
    return out

  def _fid(self) -> dict:
    """FID of the anonymized and of the recovered set against the originals, or why not."""
    n = len(self.fid_features["original"])
    if self.inception_features is None:
      return {"fid": FID_SKIPPED}
    if n < 2:
      return {"fid": f"skipped: FID needs at least 2 evaluated images, got {n}"}
    original = np.stack(self.fid_features["original"])
    return {"fid": f"InceptionV3 pool3 features of {n} images (FID grows as the image count "
                   "shrinks: compare figures at equal counts)",
            "fid_anonymized": fid.fid(np.stack(self.fid_features["anonymized"]), original),
            "fid_recovered": fid.fid(np.stack(self.fid_features["recovered"]), original)}


TABLE = (  # (metric, label, better)
    ("id_cosine_anonymized", "ID cosine orig vs anon", "lower"),
    ("retrieval_top1", "Retrieval top-1 (ArcFace)", "lower"),
    ("retrieval_top5", "Retrieval top-5 (ArcFace)", "lower"),
    ("dlib_still_matches", "dlib still matches (< 0.6)", "lower"),
    ("pose_error_deg", "Pose error (deg)", "lower"),
    ("expression_error", "Expression coeff. MSE", "lower"),
    ("landmark_error_px", "Landmark error (px)", "lower"),
    ("anonymized_face_detected", "Face detection rate (anon)", "higher"),
    ("psnr_db", "Recovery PSNR (dB)", "higher"),
    ("ssim", "Recovery SSIM", "higher"),
    ("lpips", "Recovery LPIPS", "lower"),
    ("mae", "Recovery MAE", "lower"),
    ("id_cosine_recovered", "ID cosine orig vs recovered", "higher"),
    ("bit_error_rate_float", "Bit error rate (float crop)", "lower"),
    ("bit_error_rate_png", "Bit error rate (PNG)", "lower"),
    ("bit_error_rate_jpeg90", "Bit error rate (JPEG 90)", "lower"),
    ("bit_error_rate_jpeg75", "Bit error rate (JPEG 75)", "lower"),
    ("same_key_same_person_cosine", "Same key, same person: anon ID cosine", "higher"),
    ("other_key_cosine", "Other key: anon ID cosine", "lower"),
    ("wrong_key_rejected", "Wrong key rejected", "higher"),
    ("wrong_key_id_cosine", "Wrong key: recovered ID cosine", "lower"),
    ("fid_anonymized", "FID anon vs orig", "lower"),
    ("fid_recovered", "FID recovered vs orig", "lower"),
)


def markdown(summary: dict, title: str) -> str:
  lines = [f"# {title}", "", f"{summary['images']} image(s); failures: {len(summary['failures'])}",
           "", "| metric | value | better |", "|---|---|---|"]
  for key, label, better in TABLE:
    if key in summary:
      lines.append(f"| {label} | {summary[key]:.4f} | {better} |")
  lines += ["", f"FID: {summary['fid']}"]
  lines += [f"- {f}" for f in summary["failures"]]
  return "\n".join(lines) + "\n"


def run(tool: photo.Anonymizer, paths: Sequence[str], out_dir: str,
        wrong_key: keys.Key | None = None, limit: int | None = None,
        progress: Callable[[Iterable], Iterable] = iter, fid_bundle: str | None = None) -> dict:
  """Evaluate every image of `paths` (files or folders) and write the report to out_dir.

  fid_bundle: a bundle folder holding the FID InceptionV3 (`g2face convert --inception`)
  to compute FID.
  """
  files.check_output_folder(out_dir)
  features = None
  if fid_bundle is not None:
    features = fid.features_from_bundle(fid_bundle)
  wrong_key = wrong_key or keys.generate()
  evaluation = Evaluation(tool, wrong_key, keys.generate(), inception_features=features)
  items = files.collect_inputs(paths)[:limit]
  for src, _ in progress(items):
    try:
      evaluation.add(src, read_face(src, tool.size))
    except (images.ImageError, photo.FileError) as e:
      evaluation.failures.append(str(e) if str(e).startswith(src) else f"{src}: {e}")
  summary = evaluation.summary()
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(summary, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(summary, f"g2face eval: {tool.bundle.path}"))
  if evaluation.grid_rows:
    images.write_png(os.path.join(out_dir, "grid.png"),
                     np.concatenate(evaluation.grid_rows[:8], axis=0))
  return summary
