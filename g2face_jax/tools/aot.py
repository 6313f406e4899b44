"""Ahead-of-time compilation of the training iteration for a Cloud TPU slice, on any machine.

The TPU runtime package (`libtpu`, extra `tpu`) describes any TPU topology without a
chip (`jax.experimental.topologies`). XLA then compiles the real sharded train step of
`train.runtime` (anonymize, recover and discriminator updates, R1 under its `cond`)
for that slice from abstract inputs: no parameter or image is ever materialised. The
compiled program gives per-chip memory (`memory_analysis`) and FLOPs
(`cost_analysis`); the TPU compiler itself refuses a program that does not fit the
chip's HBM. Step time, images/s and MFU are estimates from Google's published peak
figures, never measurements.

`compile_train_step(config, "v5e-256", ...)` returns one flat report dict;
`sharding_record(config, data, fsdp)` the partition spec of every train-state leaf.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh

from g2face_jax import models
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import runtime
from g2face_jax.train import sharding
from g2face_jax.train import state as state_lib

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation, as Google publishes it in the Cloud TPU system architecture
  pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): peak bf16 FLOP/s, HBM
  capacity and bandwidth per chip. v4 and v5p chips have two TensorCores run as one
  device (megacore) and their Cloud TPU names count cores: v4-8 is 4 chips."""
  generation: str
  cores_per_chip: int
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_s: float
  shapes: dict  # chips -> the slice shape Cloud TPU provisions for that count


_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}

CHIPS = {
    # v4: 275 TFLOP/s (bf16), 32 GiB HBM2 at 1200 GB/s
    "v4": Chip("v4", 2, 32 * GIB, 275e12, 1200e9, _SHAPES_3D),
    # v5e: 197 TFLOP/s (bf16), "16 GB" HBM2 at 819 GB/s
    "v5e": Chip("v5e", 1, 16 * GIB, 197e12, 819e9, _SHAPES_2D),
    # v5p: 459 TFLOP/s (bf16), "95 GB" HBM2e at 2765 GB/s
    "v5p": Chip("v5p", 2, 95 * GIB, 459e12, 2765e9, {**_SHAPES_3D, 6144: "16x16x24"}),
    # v6e (Trillium): 918 TFLOP/s (bf16), "32 GB" HBM at 1640 GB/s
    "v6e": Chip("v6e", 1, 32 * GIB, 918e12, 1640e9, _SHAPES_2D),
}
_GENERATION_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # gcloud's accelerator types


@dataclasses.dataclass(frozen=True)
class Slice:
  """A named TPU slice: `topology` is the form `get_topology_desc` takes ('v5e:16x16')."""
  name: str
  chip: Chip
  topology: str
  chips: int
  num_slices: int = 1

  @property
  def devices(self) -> int:
    return self.chips * self.num_slices


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5e-256', 'v5litepod-16', 'v4-8' (cores: 4 chips), 'v5p-128', 'v6e-64', or an
  explicit 'v5e:4x4' / 'v5p:4x4x20' -> Slice. `num_slices` slices joined over DCN."""
  if num_slices < 1:
    raise ValueError(f"--slices must be >= 1, got {num_slices}")
  known = ", ".join(sorted(CHIPS))
  m = re.fullmatch(r"([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name.strip().lower())
  gen = m and _GENERATION_ALIASES.get(m.group(1), m.group(1))
  if not m or gen not in CHIPS:
    raise ValueError(f"unknown TPU topology '{name}': give a Cloud TPU name such as v5e-256, "
                     f"v4-8 or v5p-128, or GENERATION:SHAPE such as v5e:4x4 ({known})")
  chip = CHIPS[gen]
  if m.group(3):
    dims = [int(d) for d in m.group(3).split("x")]
    if len(dims) != len(next(iter(chip.shapes.values())).split("x")):
      raise ValueError(f"{name}: a {gen} slice shape has "
                       f"{len(next(iter(chip.shapes.values())).split('x'))} dimensions")
    return Slice(name, chip, f"{gen}:{m.group(3)}", int(np.prod(dims)), num_slices)
  count = int(m.group(2))
  chips = count // chip.cores_per_chip
  if count % chip.cores_per_chip or chips not in chip.shapes:
    sizes = ", ".join(f"{gen}-{c * chip.cores_per_chip}" for c in chip.shapes)
    raise ValueError(f"{name}: no standard {gen} slice of that size ({sizes}); give the "
                     f"shape instead, e.g. {gen}:{next(reversed(chip.shapes.values()))}")
  return Slice(name, chip, f"{gen}:{chip.shapes[chips]}", chips, num_slices)


def topology_devices(sl: Slice) -> list:
  """The compile-only TPU devices of the slice(s) (needs the `libtpu` package)."""
  # Compile-only use opens no chip: allow it beside another process that holds libtpu's
  # lock (a training job, or a second test worker).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  kwargs = {"chip_config_name": "megacore"} if sl.chip.cores_per_chip == 2 else {}
  try:
    topo = topologies.get_topology_desc(sl.topology, "tpu", num_slices=sl.num_slices, **kwargs)
  except RuntimeError as e:
    if "TPU support not installed" in str(e):
      raise ImportError("the TPU runtime package is missing: pip install -e '.[tpu]' "
                        "(libtpu) to compile for TPU slices") from e
    raise
  if len(topo.devices) != sl.devices:
    raise ValueError(f"{sl.name}: libtpu describes {len(topo.devices)} devices, "
                     f"expected {sl.devices}")
  return list(topo.devices)


def parse_mesh(text: str) -> tuple[int, int]:
  """'data=D,fsdp=F' (either may be left out; data=-1 takes the rest) -> (data, fsdp)."""
  sizes = {"data": -1, "fsdp": 1}
  for part in filter(None, text.split(",")):
    key, _, value = part.partition("=")
    if key not in sizes or not re.fullmatch(r"-?\d+", value):
      raise ValueError(f"--mesh '{text}': expected data=D,fsdp=F (integers)")
    sizes[key] = int(value)
  return sizes["data"], sizes["fsdp"]


def _mesh_sizes(devices: int, num_slices: int, data: int, fsdp: int) -> tuple[int, int]:
  if fsdp < 1 or devices % fsdp:
    raise ValueError(f"fsdp={fsdp} does not divide the {devices} devices")
  data = devices // fsdp if data == -1 else data
  if data * fsdp != devices:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not match the {devices} devices")
  if data % num_slices:
    raise ValueError(f"data={data} is not a multiple of the {num_slices} slices (the data axis "
                     f"spans slices; fsdp stays within one)")
  return data, fsdp


def device_grid(devices: list, data: int, fsdp: int, num_slices: int) -> np.ndarray:
  """Devices arranged (data, fsdp) by the physical topology; over several slices the
  data axis crosses slices (DCN) and fsdp stays on one slice's ICI."""
  from jax.experimental import mesh_utils
  if num_slices == 1:
    return mesh_utils.create_device_mesh((data, fsdp), devices)
  return mesh_utils.create_hybrid_device_mesh((data // num_slices, fsdp), (num_slices, 1),
                                              devices)


def abstract_frozen(config: ml_collections.ConfigDict) -> dict:
  """ShapeDtypeStructs of the frozen networks and the BFM that `g2face train` would use
  (the BFM of the `pretrained.bundle`, else the small synthetic stand-in)."""
  out = {name: models.abstract_variables(config.model, name) for name in frozen_lib.FROZEN_NETS}
  out["bfm"] = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                            frozen_lib.bfm_of(config))
  return out


def abstract_state(config: ml_collections.ConfigDict) -> state_lib.TrainState:
  return jax.eval_shape(functools.partial(state_lib.init_state, config), jax.random.key(0))


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


# ---- sharding record -------------------------------------------------------------------

def _spec_entry(spec_axis):
  return list(spec_axis) if isinstance(spec_axis, tuple) else spec_axis


def sharding_record(config: ml_collections.ConfigDict, data: int, fsdp: int) -> dict:
  """{'mesh', 'batch', 'leaves': {path: {'shape', 'spec'}}} of the train state on an
  abstract (data, fsdp) mesh: the partition spec of every leaf, from the config's
  logical axis rules (no devices needed)."""
  mesh = AbstractMesh((data, fsdp), sharding.MESH_AXES)
  state = abstract_state(config)
  shardings = sharding.state_shardings(state, mesh, config.mesh)
  leaves = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(state),
                              jax.tree.leaves(shardings)):
    spec = list(sh.spec) + [None] * (len(leaf.shape) - len(sh.spec))
    leaves[jax.tree_util.keystr(path)] = {"shape": list(leaf.shape),
                                          "spec": [_spec_entry(s) for s in spec]}
  batch = sharding.batch_sharding(mesh, config.mesh).spec
  return {"mesh": {"data": data, "fsdp": fsdp}, "batch": [_spec_entry(s) for s in batch],
          "leaves": leaves}


# ---- parameter groups ------------------------------------------------------------------

_NETWORK_GROUPS = {"style_mapper": "mappers", "map_2_id": "mappers", "extractor": "extractor"}


def _state_groups(state: state_lib.TrainState) -> Any:
  """A tree like `state` with the report group of every leaf."""
  labels = state_lib.generator_labels(state.params)
  params = {net: jax.tree.map(
      lambda lab, n=net: (("decoder" if lab == "pretrained" else "encoders") if n == "decoder"
                          else _NETWORK_GROUPS[n]), labels[net])
            for net in state.params}
  const = lambda name: (lambda tree: jax.tree.map(lambda _: name, tree))  # noqa: E731
  return state.replace(step="other", rng="other", params=params,
                       batch_stats=const("batch statistics")(state.batch_stats),
                       opt_state=const("optimizer state")(state.opt_state),
                       disc_params=const("discriminator")(state.disc_params),
                       disc_opt_state=const("optimizer state")(state.disc_opt_state))


def _leaf_bytes(leaf, sh=None) -> int:
  shape = sh.shard_shape(leaf.shape) if sh is not None else leaf.shape
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


GROUP_ORDER = ("decoder", "encoders", "mappers", "extractor", "discriminator",
               "optimizer state", "batch statistics", "other", "frozen networks")


def parameter_groups(state, state_sh, frozen, frozen_sh) -> dict:
  """{group: {'bytes', 'bytes_per_device', 'leaves', 'sharded_leaves'}}; 'decoder' is the
  StyleGAN2 synthesis, 'encoders' the decoder's pyramid, fusion masks and hiding
  injections, 'mappers' the style mapper and map_2_id."""
  out = {g: {"bytes": 0, "bytes_per_device": 0, "leaves": 0, "sharded_leaves": 0}
         for g in GROUP_ORDER}
  groups = jax.tree.leaves(_state_groups(state)) + ["frozen networks"] * len(jax.tree.leaves(frozen))
  leaves = jax.tree.leaves(state) + jax.tree.leaves(frozen)
  shardings = jax.tree.leaves(state_sh) + jax.tree.leaves(frozen_sh)
  for group, leaf, sh in zip(groups, leaves, shardings, strict=True):
    g = out[group]
    g["bytes"] += _leaf_bytes(leaf)
    g["bytes_per_device"] += _leaf_bytes(leaf, sh)
    g["leaves"] += 1
    g["sharded_leaves"] += int(any(s is not None for s in sh.spec))
  return out


# ---- compile ---------------------------------------------------------------------------

# XLA's TPU out-of-memory compile errors state the need and the capacity in one of two forms
_OOM_FORMS = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
              re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _hbm_oom(error: Exception) -> tuple[int, int] | None:
  """(required, available) bytes of XLA's TPU out-of-memory compile error, else None."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text:
    return None
  for form in _OOM_FORMS:
    m = form.search(text)
    if m:
      return (int(float(m.group(1)) * _UNITS[m.group(2)]),
              int(float(m.group(3)) * _UNITS[m.group(4)]))
  return None


def _configured(config, global_batch, data, fsdp, remat) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  if global_batch is not None:
    config.train.global_batch = global_batch
  if remat is not None:
    config.train.remat = remat
  config.mesh.data, config.mesh.fsdp = data, fsdp
  return config


def compile_train_step(config: ml_collections.ConfigDict, topology: str, *,
                       global_batch: int | None = None, mesh: str = "",
                       remat: str | None = None, num_slices: int = 1) -> dict:
  """Lower and compile the training iteration of `config` for a TPU slice; a flat report
  (bytes per device, FLOPs, estimates from the published peak, parameter groups,
  seconds spent). `fits` is False (with `required_bytes`, `exceeded_by_bytes` and a
  `hint`) when the TPU compiler refuses the program for lack of HBM."""
  sl = parse_slice(topology, num_slices)
  devices = topology_devices(sl)
  data, fsdp = parse_mesh(mesh) if mesh else (config.mesh.data, config.mesh.fsdp)
  data, fsdp = _mesh_sizes(sl.devices, num_slices, data, fsdp)
  config = _configured(config, global_batch, data, fsdp, remat)
  b = config.train.global_batch
  if b % sl.devices or b % config.train.replica_batch:
    raise ValueError(f"global batch {b} must be a multiple of the {sl.devices} devices and of "
                     f"replica_batch {config.train.replica_batch}")
  grid = device_grid(devices, data, fsdp, num_slices)
  frozen = abstract_frozen(config)
  rt = runtime.create(config, config.train.steps_per_epoch or 1000, frozen,
                      devices=grid.reshape(-1))
  state = abstract_state(config)
  step = rt.train_step
  size = config.model.size
  images = jax.ShapeDtypeStruct((b, size, size, 3), np.float32, sharding=rt.batch_sharding)
  report = {
      "topology": sl.name, "tpu_topology": sl.topology, "chip": sl.chip.generation,
      "devices": sl.devices, "slices": num_slices, "mesh": {"data": data, "fsdp": fsdp},
      "global_batch": b, "batch_per_device": b // sl.devices,
      "remat": config.train.remat, "compute_dtype": config.train.compute_dtype,
      "image_size": size, "config_variant": config.get("variant", ""),
      "published_hbm_bytes": sl.chip.hbm_bytes, "peak_flops_per_device": sl.chip.peak_flops,
      "groups": parameter_groups(state, rt.state_sharding, frozen, rt.frozen_sharding),
  }
  report["state_bytes"] = sum(g["bytes"] for k, g in report["groups"].items()
                              if k != "frozen networks")
  start = time.perf_counter()
  lowered = step.lower(_with_sharding(state, rt.state_sharding),
                       _with_sharding(frozen, rt.frozen_sharding), images)
  report["lower_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler's out-of-HBM refusal is a result, not a crash
    oom = _hbm_oom(e)
    if oom is None:
      raise
    report["compile_seconds"] = time.perf_counter() - start
    return refused(report, *oom)
  report["compile_seconds"] = time.perf_counter() - start
  report.update(_memory(compiled, sl.chip), fits=True)
  report.update(_speed(compiled, sl, b))
  return report


def refused(report: dict, required: int, available: int) -> dict:
  """`report` of a step the TPU compiler refused for lack of HBM: the bytes it needs and
  has per chip, and a hint naming the knobs that help."""
  report.update(fits=False, required_bytes=required, device_memory_bytes=available,
                exceeded_by_bytes=required - available)
  report["hint"] = _hint(report)
  return report


def _memory(compiled, chip: Chip) -> dict:
  m = compiled.memory_analysis()
  out = {"argument_bytes_per_device": int(m.argument_size_in_bytes),
         "output_bytes_per_device": int(m.output_size_in_bytes),
         "alias_bytes_per_device": int(m.alias_size_in_bytes),
         "temp_bytes_per_device": int(m.temp_size_in_bytes),
         "generated_code_bytes_per_device": int(m.generated_code_size_in_bytes)}
  # Live at once: arguments, outputs not written in place of a donated argument, temporaries.
  out["peak_bytes_per_device"] = int(m.peak_memory_in_bytes) or (
      out["argument_bytes_per_device"] + out["output_bytes_per_device"]
      - out["alias_bytes_per_device"] + out["temp_bytes_per_device"])
  out["device_memory_bytes"] = chip.hbm_bytes
  return out


def _speed(compiled, sl: Slice, global_batch: int) -> dict:
  """FLOPs of one device's program (XLA cost analysis) and what the published peak makes
  of them: compute time at 100% of peak, HBM time at the published bandwidth, and the
  larger of the two as the step-time estimate (collectives and overlap not modelled)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  hbm = float(cost.get("bytes accessed", 0.0))
  compute_s = flops / sl.chip.peak_flops
  memory_s = hbm / sl.chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {"flops_per_device": flops, "flops_per_step": flops * sl.devices,
          "hbm_bytes_accessed_per_device": hbm,
          "estimated_compute_seconds": compute_s, "estimated_hbm_seconds": memory_s,
          "estimated_step_seconds": step_s,
          "estimated_images_per_second": global_batch / step_s if step_s else 0.0,
          "estimated_mfu": compute_s / step_s if step_s else 0.0}


def _hint(report: dict) -> str:
  """Which knob helps an out-of-HBM step, given the run's settings."""
  over = report["exceeded_by_bytes"] / GIB
  data, fsdp = report["mesh"]["data"], report["mesh"]["fsdp"]
  per_dev = report["batch_per_device"]
  knobs = []
  if per_dev > 1:
    knobs.append(f"a smaller per-chip batch (now {per_dev}: --global-batch "
                 f"{report['global_batch'] // 2})")
  if report["remat"] == "none":
    knobs.append("--remat full (recompute activations in the backward pass)")
  if report["compute_dtype"] == "float32":
    knobs.append("bfloat16 compute (--config ...,train.compute_dtype=bfloat16)")
  state_dev = sum(g["bytes_per_device"] for g in report["groups"].values())
  if data > 1:
    knobs.append(f"a wider fsdp axis (--mesh data={data // 2},fsdp={fsdp * 2}) to split the "
                 f"{state_dev / GIB:.2f} GiB of state and frozen networks each chip holds")
  if not knobs:
    knobs.append("a chip with more HBM or a smaller model")
  return f"exceeds the chip's HBM by {over:.2f} GiB; try " + "; or ".join(knobs)


# ---- text ------------------------------------------------------------------------------

def _gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def format_report(r: dict) -> str:
  """Human-readable lines of a `compile_train_step` report."""
  head = (f"{r['config_variant'] or 'config'} {r['image_size']}px on {r['topology']} "
          f"({r['tpu_topology']}, {r['devices']} devices"
          + (f", {r['slices']} slices" if r["slices"] > 1 else "") + f"), mesh data="
          f"{r['mesh']['data']} x fsdp={r['mesh']['fsdp']}, global batch {r['global_batch']} "
          f"({r['batch_per_device']} per chip), remat {r['remat']}, {r['compute_dtype']} "
          "compute")
  lines = [head, f"lowered in {r['lower_seconds']:.1f} s, compiled in {r['compile_seconds']:.1f} s"]
  if not r["fits"]:
    lines.append(f"DOES NOT FIT: needs {_gib(r['required_bytes'])} per chip, "
                 f"{_gib(r['device_memory_bytes'])} available: {r['hint']}")
  else:
    lines += [
        f"per chip: arguments {_gib(r['argument_bytes_per_device'])}, outputs "
        f"{_gib(r['output_bytes_per_device'])} (aliased {_gib(r['alias_bytes_per_device'])}), "
        f"temporaries {_gib(r['temp_bytes_per_device'])}",
        f"peak {_gib(r['peak_bytes_per_device'])} of {_gib(r['device_memory_bytes'])} HBM "
        f"({100 * r['peak_bytes_per_device'] / r['device_memory_bytes']:.0f}%): fits",
        f"FLOPs per step {r['flops_per_step']:.3e} ({r['flops_per_device']:.3e} per chip)",
        f"estimate from the published peak ({r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s "
        f"bf16 per chip), not a measurement: step >= {r['estimated_step_seconds'] * 1e3:.1f} ms "
        f"(compute {r['estimated_compute_seconds'] * 1e3:.1f} ms, HBM "
        f"{r['estimated_hbm_seconds'] * 1e3:.1f} ms), <= {r['estimated_images_per_second']:.0f} "
        f"images/s, MFU <= {100 * r['estimated_mfu']:.0f}%",
    ]
  lines.append(f"state {_gib(r['state_bytes'])} in all; per group (total -> per chip, "
               f"sharded leaves / leaves):")
  for name, g in r["groups"].items():
    if g["leaves"]:
      lines.append(f"  {name:18s} {_gib(g['bytes']):>11s} -> {_gib(g['bytes_per_device']):>11s}"
                   f"  {g['sharded_leaves']}/{g['leaves']}")
  return "\n".join(lines)
