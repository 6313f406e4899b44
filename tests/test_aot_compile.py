"""`g2face compile` through the real TPU compiler (libtpu, no TPU needed): the tiny
config's whole training iteration for a v5e-4 slice, in a fresh process (libtpu and the
platform choice are per process). Needs the `tpu` extra; skipped only where libtpu is
not installed."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libtpu", reason="the TPU runtime package (pip install -e '.[tpu]')")

from g2face_jax import config
from g2face_jax.tools import aot  # noqa: E402

GIB = 2 ** 30


def _compile(*args, timeout=1500, env=None):
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", **(env or {}))
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run([sys.executable, "-m", "g2face_jax.cli", "compile", *args],
                        capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.slow  # about 3 minutes on 2 CPU cores
def test_tiny_step_compiles_for_a_v5e_4_slice():
  # XLA's O0 keeps the TPU compile of the whole step to minutes on 2 cores (the default
  # level takes over ten); the properties below hold at any level.
  out = _compile("--config", "tiny", "--topology", "v5e-4", "--global-batch", "8",
                 "--mesh", "data=2,fsdp=2", "--json", env={"JAX_OPTIMIZATION_LEVEL": "O0"})
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout)
  assert (r["topology"], r["tpu_topology"], r["devices"]) == ("v5e-4", "v5e:2x2", 4)
  assert r["mesh"] == {"data": 2, "fsdp": 2} and r["global_batch"] == 8
  assert r["fits"] is True and r["device_memory_bytes"] == 16 * GIB
  # every argument is on the chip: at least this device's shards of state, frozen nets and
  # images (TPU layouts pad small arrays, so XLA's figure may be larger)
  cfg = config.load("tiny")
  held = sum(g["bytes_per_device"] for g in r["groups"].values())
  images = 8 // 4 * cfg.model.size ** 2 * 3 * 4
  assert r["argument_bytes_per_device"] >= held + images
  assert r["argument_bytes_per_device"] <= r["peak_bytes_per_device"] < r["device_memory_bytes"]
  assert r["alias_bytes_per_device"] > 0  # the donated state is updated in place
  assert r["flops_per_device"] > 0
  assert r["flops_per_step"] == pytest.approx(4 * r["flops_per_device"])
  assert r["estimated_step_seconds"] == pytest.approx(
      max(r["flops_per_device"] / 197e12, r["hbm_bytes_accessed_per_device"] / 819e9))
  assert 0 < r["estimated_mfu"] <= 1
  assert r["groups"]["decoder"]["sharded_leaves"] > 0


def test_unknown_topology_is_one_line_error():
  out = _compile("--config", "tiny", "--topology", "v5e-12")
  assert out.returncode == 2
  assert out.stderr.strip().count("\n") == 0 and "no standard v5e slice" in out.stderr


def test_batch_not_a_multiple_of_the_chips_is_refused():
  out = _compile("--config", "tiny", "--topology", "v5e-8", "--global-batch", "4")
  assert out.returncode == 2
  assert "must be a multiple of the 8 devices" in out.stderr


def test_topology_devices_of_v4_and_multislice():
  # v4 runs its two TensorCores per chip as one device (megacore): v4-8 is 4 devices
  assert len(aot.topology_devices(aot.parse_slice("v4-8"))) == 4
  devices = aot.topology_devices(aot.parse_slice("v5e-16", num_slices=2))
  grid = aot.device_grid(devices, 8, 4, num_slices=2)
  slice_of = np.vectorize(lambda d: d.slice_index)(grid)
  # the data axis crosses the two slices; each fsdp row stays on one slice
  assert sorted(set(slice_of[:, 0])) == [0, 1]
  assert all(len(set(row)) == 1 for row in slice_of)


def test_refused_step_reports_the_excess_and_the_knobs():
  # figures of the paper config refused on v5e-256 (global batch 256, data=16 x fsdp=16)
  report = {"mesh": {"data": 16, "fsdp": 16}, "batch_per_device": 1, "remat": "none",
            "compute_dtype": "float32", "global_batch": 256,
            "groups": {"decoder": {"bytes": GIB, "bytes_per_device": GIB // 10, "leaves": 3,
                                   "sharded_leaves": 2}}}
  out = aot.refused(report, required=22387517030, available=16911433728)
  assert out["fits"] is False and out["exceeded_by_bytes"] == 22387517030 - 16911433728
  assert out["hint"].startswith("exceeds the chip's HBM by 5.10 GiB; try --remat full")
  assert "--mesh data=8,fsdp=32" in out["hint"] and "--global-batch" not in out["hint"]
  assert "train.compute_dtype=bfloat16" in out["hint"]  # with which this step fits (README)
  bf16 = aot.refused(dict(report, compute_dtype="bfloat16"), required=2 * GIB, available=GIB)
  assert "compute_dtype" not in bf16["hint"]
  text = aot.format_report(dict(out, topology="v5e-256", tpu_topology="v5e:16x16", devices=256,
                                slices=1, image_size=256, config_variant="paper",
                                lower_seconds=1.0, compile_seconds=2.0, state_bytes=0))
  assert "DOES NOT FIT: needs 20.85 GiB per chip, 15.75 GiB available" in text


def test_hbm_refusal_is_read_from_the_compiler_error():
  # the part of XLA's TPU out-of-memory message that the figures are read from
  error = RuntimeError("RESOURCE_EXHAUSTED: ... Program hbm requirement (20.85G) exceeds "
                       "available HBM (15.75G) ...")
  required, available = aot._hbm_oom(error)
  assert required == int(20.85 * GIB) and available == int(15.75 * GIB)
  # the other form, as libtpu printed it for the paper config with --remat full on v5e-256
  error = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent "
                       "error. Ran out of memory in memory space hbm. Used 16.00G of 15.75G hbm. "
                       "Exceeded hbm capacity by 260.76M.")
  assert aot._hbm_oom(error) == (int(16.0 * GIB), int(15.75 * GIB))
  assert aot._hbm_oom(RuntimeError("INTERNAL: something else")) is None
