"""`g2face export`: the newest checkpoint of a training workdir -> a model bundle.

The bundle holds the trained decoder, style mapper, map_2_id, extractor and
discriminator, and the frozen networks and BFM the run trained with (those of
its `pretrained.bundle`, whose source files it records, or the same random
stand-ins for smoke runs), so `g2face anonymize --bundle OUT` runs the trained
model.
"""
from __future__ import annotations

import os

import jax

from g2face_jax import bundle
from g2face_jax import config as config_lib
from g2face_jax.train import checkpoint as checkpoint_lib
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import pretrained as pretrained_lib
from g2face_jax.train import runtime
from g2face_jax.train import state as state_lib

CONFIG_SPEC = "config_spec.txt"  # the --config string of the run, written by `g2face train`


def save_config_spec(workdir: str, spec: str) -> None:
  """Write the run's --config string with its config file and `pretrained.bundle` as
  absolute paths, so `export` finds them from any folder.

  Refuses (ValueError, writing nothing) when workdir already holds checkpoints and the
  config they were trained with (its config_spec.txt) has other `model` settings:
  such a resume would continue a different model, even where no shape changes.
  Other sections may change between runs."""
  spec = _absolute(spec)
  check_config_spec(workdir, spec)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_SPEC), "w", encoding="utf-8") as f:
    f.write(spec + "\n")


def _absolute(spec: str) -> str:
  """The --config string with its config file and `pretrained.bundle` as absolute paths."""
  path, sep, rest = spec.partition(".py")
  if sep:
    spec = os.path.abspath(path + sep) + rest
  parts = spec.split(",")
  for i, part in enumerate(parts):
    key, eq, value = part.partition("=")
    if key == "pretrained.bundle" and eq and value:
      parts[i] = f"{key}={os.path.abspath(value)}"
  return ",".join(parts)


def check_config_spec(workdir: str, spec: str) -> None:
  """ValueError naming workdir and the differing `model.*` settings (saved -> new) when
  workdir has checkpoints made with another model config; writes nothing."""
  spec = _absolute(spec)
  path = os.path.join(workdir, CONFIG_SPEC)
  if not (os.path.isfile(path) and _has_checkpoints(workdir)):
    return
  with open(path, encoding="utf-8") as f:
    saved_spec = f.read().strip()
  try:
    saved = config_lib.load(saved_spec)
  except Exception as e:
    reason = (str(e).strip().splitlines() or [""])[0]
    raise ValueError(
        f"{workdir}: the config its checkpoints were trained with ({CONFIG_SPEC}: "
        f"{saved_spec!r}) does not load ({type(e).__name__}: {reason}); restore that "
        f"config, or use a new workdir") from e
  old, new = _flat(saved.model.to_dict()), _flat(config_lib.load(spec).model.to_dict())
  differing = [f"model.{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if differing:
    raise ValueError(
        f"{workdir}: its checkpoints were trained with other model settings: "
        f"{', '.join(differing)}; resume with the model settings of {path}, or use a new "
        f"workdir")


def _has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(
      name.isdigit() and os.path.isdir(os.path.join(folder, name)) for name in os.listdir(folder))


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def load_config(workdir: str):
  path = os.path.join(workdir, CONFIG_SPEC)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not a training workdir (no {CONFIG_SPEC})")
  with open(path, encoding="utf-8") as f:
    return config_lib.load(f.read().strip())


def export(workdir: str, out: str, log=print) -> str:
  """Write the bundle of workdir's newest readable checkpoint to `out`; returns its path."""
  config = load_config(workdir)
  config.unlock()
  config.mesh.data, config.mesh.fsdp = 1, 1  # export gathers everything on one device
  pretrained = pretrained_lib.open_bundle(config)
  frozen = frozen_lib.frozen_variables(config, config.train.seed + 1, pretrained)
  rt = runtime.create(config, 1, frozen, devices=jax.local_devices()[:1])
  abstract = jax.eval_shape(lambda: runtime.init_state(rt, jax.random.key(0)))
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: no checkpoints to export")
  checkpointer = checkpoint_lib.Checkpointer(folder, config.checkpoint)
  try:
    state, step = checkpointer.restore_state(
        checkpoint_lib.abstract_with_shardings(abstract, rt.state_sharding))
  finally:
    checkpointer.close()
  state = jax.device_get(state)
  variables = {}
  for name in state_lib.GENERATOR_NETS:
    variables[name] = {"params": state.params[name]}
    if name in state.batch_stats:
      variables[name]["batch_stats"] = state.batch_stats[name]
  variables["discriminator"] = {"params": state.disc_params}
  for name in frozen_lib.FROZEN_NETS:
    variables[name] = jax.device_get(frozen[name])
  sources = pretrained.manifest.get("sources", {}) if pretrained is not None else {}
  path = bundle.save(out, config, variables, bfm=jax.device_get(frozen["bfm"]),
                     recorded_sources=sources)
  log(f"exported step {step} of {workdir} to {path}")
  return path
