"""A model bundle on disk: every converted (or trained) network in one Orbax
checkpoint, plus a JSON manifest. Loading needs no torch.

Layout of a bundle folder:
  manifest.json   format version, package version, the model config, the
                  networks present, the SHA-256 of each source file and, once
                  `g2face calibrate` ran, its 'calibration' (the measured payload
                  channel, the payload layout fitted to it, the verify threshold)
  variables/      Orbax checkpoint: {network name: Flax variables, 'bfm': BFM arrays}
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from g2face_jax import models
from g2face_jax.nn.bfm import BFM

FORMAT = "g2face-bundle/1"
MANIFEST = "manifest.json"
VARIABLES = "variables"

# Which `g2face convert` option brings each part, for "missing" errors.
SOURCE_OF = {
    "decoder": "--g2face (or --stylegan for a training start)",
    "style_mapper": "--g2face", "map_2_id": "--g2face", "extractor": "--g2face",
    "discriminator": "--g2face", "arcface": "--arcface", "recon_net": "--d3dfr",
    "bfm": "--bfm", "lpips": "--lpips-vgg16 and --lpips-heads",
    "inception": "--inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)",
}


class BundleError(ValueError):
  """A bundle folder is missing, damaged or lacks what a command needs."""


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {tuple(getattr(k, "key", str(k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def sha256_of(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def package_version() -> str:
  try:
    return importlib.metadata.version("g2face_jax")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"


@dataclasses.dataclass
class Bundle:
  """A loaded bundle. variables: {network name: Flax variables} (NumPy arrays)."""
  path: str
  config: ml_collections.ConfigDict
  variables: dict[str, Any]
  bfm: BFM | None
  manifest: dict

  def require(self, *names: str, purpose: str) -> None:
    """Raise a one-line BundleError if any of `names` (networks or 'bfm') is absent."""
    have = set(self.variables) | ({"bfm"} if self.bfm is not None else set())
    missing = [n for n in names if n not in have]
    if missing:
      hints = "; ".join(f"{n} comes from `g2face convert {SOURCE_OF.get(n, '?')}`" for n in missing)
      raise BundleError(f"{self.path}: bundle has no {', '.join(missing)}, needed to {purpose} ({hints})")

  def check_fits(self, model: ml_collections.ConfigDict, *names: str, purpose: str) -> None:
    """Raise a one-line BundleError if a network of `names` has other variable shapes than
    `model` (a config's `model` section) builds, naming the model fields that differ."""
    for name in names:
      want = _shapes(models.abstract_variables(model, name))
      got = _shapes(self.variables[name])
      if got == want:
        continue
      where = (sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]])[0]
      differ = _differing_fields(self.config.model, model)
      hint = (f"the bundle was converted for model {differ}" if differ
              else "its model config matches, the stored arrays do not")
      raise BundleError(f"{self.path}: the bundle's {name} does not fit the model needed to "
                        f"{purpose} ({'/'.join(where)}: {got.get(where, 'nothing')}, expected "
                        f"{want.get(where, 'nothing')}; {hint})")


def _differing_fields(ours: ml_collections.ConfigDict, other: ml_collections.ConfigDict) -> str:
  """'key=value, ...' of `ours` where `other` differs (JSON lists equal tuples)."""
  plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
  keys = sorted(set(ours.keys()) | set(other.keys()))
  return ", ".join(f"{k}={ours.get(k)}" for k in keys if plain(ours.get(k)) != plain(other.get(k)))


def save(out_dir: str | os.PathLike, config: ml_collections.ConfigDict,
         variables: Mapping[str, Any], bfm: BFM | None = None,
         sources: Mapping[str, str | os.PathLike] | None = None,
         recorded_sources: Mapping[str, Mapping[str, str]] | None = None) -> str:
  """Write a bundle to `out_dir` (which must not exist or be empty); returns its path.

  config: the full config (its `model` section builds the networks);
  sources: {option name: file it was converted from}, recorded with SHA-256;
  recorded_sources: entries already in that form ({'file', 'sha256'}), e.g. the
  sources of the bundle a training run started from.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise BundleError(f"{out_dir}: output exists and is not an empty folder")
  if not variables and bfm is None:
    raise BundleError(f"{out_dir}: nothing to write (no network and no BFM given)")
  tree = {name: jax.tree_util.tree_map(np.asarray, v) for name, v in variables.items()}
  if bfm is not None:
    tree["bfm"] = {f.name: np.asarray(getattr(bfm, f.name)) for f in dataclasses.fields(BFM)}
  try:
    os.makedirs(out_dir, exist_ok=True)
    ocp.PyTreeCheckpointer().save(os.path.join(out_dir, VARIABLES), tree)
  except OSError as e:
    raise BundleError(f"{out_dir}: cannot write the bundle ({e.strerror or e})") from None
  manifest = {
      "format": FORMAT,
      "package_version": package_version(),
      "config": json.loads(config.to_json()),
      "networks": sorted(variables),
      "bfm": bfm is not None,
      "sources": {**{k: dict(v) for k, v in (recorded_sources or {}).items()},
                  **{k: {"file": os.path.basename(os.fspath(p)), "sha256": sha256_of(p)}
                     for k, p in (sources or {}).items()}},
  }
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=2)
  return out_dir


def load(path: str | os.PathLike) -> Bundle:
  """Read a bundle folder written by `save`. BundleError if it is not one."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise BundleError(f"{path}: bundle folder not found")
  manifest = read_manifest(path)
  try:
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, VARIABLES))
  except Exception as e:  # Orbax raises many types for a damaged checkpoint
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise BundleError(f"{path}: damaged bundle variables ({first})") from None
  bfm_arrays = tree.pop("bfm", None)
  bfm = None
  if bfm_arrays is not None:
    bfm = BFM(**{f.name: np.asarray(bfm_arrays[f.name]) for f in dataclasses.fields(BFM)})
  missing = sorted(set(manifest.get("networks", [])) - set(tree))
  if missing:
    raise BundleError(f"{path}: damaged bundle, networks {missing} listed but not stored")
  config = ml_collections.ConfigDict(manifest["config"])
  config.lock()
  return Bundle(path=path, config=config, variables=tree, bfm=bfm, manifest=manifest)


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of the bundle folder at `path`, without its variables; BundleError."""
  path = os.path.abspath(os.fspath(path))
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise BundleError(f"{path}: bundle folder not found")
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise BundleError(f"{path}: not a g2face bundle (no {MANIFEST})") from None
  except (OSError, json.JSONDecodeError) as e:
    raise BundleError(f"{manifest_path}: unreadable manifest ({e})") from None
  if manifest.get("format") != FORMAT:
    raise BundleError(f"{manifest_path}: bundle format {manifest.get('format')!r}, "
                      f"this version reads {FORMAT!r}")
  return manifest


def update_manifest(path: str | os.PathLike, **entries) -> dict:
  """Set top-level `entries` of a bundle's manifest (written atomically); returns it."""
  manifest = read_manifest(path)
  manifest.update(entries)
  manifest_path = os.path.join(os.path.abspath(os.fspath(path)), MANIFEST)
  try:
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(manifest_path), suffix=".tmp",
                                     delete=False) as f:
      json.dump(manifest, f, indent=2)
    os.replace(f.name, manifest_path)
  except OSError as e:
    raise BundleError(f"{manifest_path}: cannot write the manifest ({e.strerror or e})") from None
  return manifest
