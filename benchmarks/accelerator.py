"""Training and inference speed on the accelerator at hand, as one JSON record.

    python benchmarks/accelerator.py [--config paper] [--train-batches 4,8,16,32,64]
        [--batches 1,32,128] [--budget-s 420] [--json-out FILE]

Prepared to run in minutes on one GPU (`--budget-s`: no new measurement starts
after that many seconds; the ones left are listed as skipped):
  train   the config's training iteration (`tools.bench.run_train`: compile
          apart, best of 2) in float32 and in bfloat16 compute, at each
          per-device batch of `--train-batches` in turn until one does not fit
          (out of memory): seconds per step, images/s, XLA's FLOPs of the
          step, MFU (those FLOPs / time / the chip's peak for that dtype),
          per-device memory of the compiled step;
  infer   the official anonymize and recover chains (`tools.bench.run`) at each
          batch of `--batches`, in float32, TF32 matmuls (GPUs) and bfloat16.
Peaks (dense, per chip) are those the vendors publish for the chips in PEAKS;
another chip gets no MFU. The record also gives the device, JAX's version and
the whole run's wall time. Prints the JSON on stdout (and writes `--json-out`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli_args import positive_int  # noqa: E402

# FLOP/s per chip, dense: (float32 without tensor cores, TF32, bfloat16) from NVIDIA's
# H100 SXM / H200 data sheets; TPU v5e and v5p bfloat16 from Google's Cloud TPU pages.
PEAKS = {"H100": {"float32": 67e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12},
         "H200": {"float32": 67e12, "tensorfloat32": 494.7e12, "bfloat16": 989.4e12},
         "TPU v5 lite": {"bfloat16": 197e12}, "TPU v5e": {"bfloat16": 197e12},
         "TPU v5p": {"bfloat16": 459e12}}


def peak_flops(device_kind: str, dtype: str) -> float | None:
  for name, peaks in PEAKS.items():
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def _out_of_memory(error: Exception) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Budget:
  def __init__(self, seconds: float):
    self.start, self.seconds, self.skipped = time.perf_counter(), seconds, []

  def allows(self, what: str) -> bool:
    if time.perf_counter() - self.start < self.seconds:
      return True
    self.skipped.append(what)
    return False


def train(config: str, batches, budget: Budget, kind: str) -> dict:
  import jax

  from g2face_jax.tools import bench
  out = {}
  for dtype in ("float32", "bfloat16"):
    best = None
    for b in batches:
      if not budget.allows(f"train {dtype} batch {b}"):
        break
      n = jax.device_count()
      name = (f"{config},train.global_batch={b * n},train.replica_batch={b},"
              f"train.compute_dtype={dtype}")
      try:
        r = bench.run_train(name, rounds=2)
      except Exception as e:  # noqa: BLE001  (out of memory ends the search)
        if _out_of_memory(e):
          out.setdefault(f"{dtype}_no_fit", b)
          break
        raise
      peak = peak_flops(kind, dtype)
      best = dict(per_device_batch=b, step_s=r["train_step_s"], img_per_s=r["train_img_per_s"],
                  compile_s=r["train_compile_s"], gflop_per_step=r["train_gflop_per_step"],
                  mfu=(r["train_gflop_per_s"] * 1e9 / (peak * n)) if peak else None,
                  argument_mb_per_device=r["argument_mb_per_device"],
                  temp_mb_per_device=r["temp_mb_per_device"])
    out[dtype] = best
  return out


def infer(config: str, batches, budget: Budget) -> dict:
  from g2face_jax.tools import bench
  out = {}
  for label, dtype, precision in (("float32", "float32", "float32"),
                                  ("tf32", "float32", "tensorfloat32"),
                                  ("bfloat16", "bfloat16", "float32")):
    for b in batches:
      if not budget.allows(f"infer {label} batch {b}"):
        continue
      try:
        r = bench.run(config, batch=b, rounds=2, dtype=dtype, matmul_precision=precision)
      except Exception as e:  # noqa: BLE001
        if _out_of_memory(e):
          out[f"{label}/{b}"] = "out of memory"
          continue
        raise
      out[f"{label}/{b}"] = dict(anonymize_img_per_s=r["anonymize_img_per_s"],
                                 recover_img_per_s=r["recover_img_per_s"],
                                 anonymize_compile_s=r["anonymize_compile_s"])
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="paper")
  p.add_argument("--train-batches", default="4,8,16,32,64",
                 help="per-device training batches to try, ascending")
  p.add_argument("--batches", default="1,32,128", help="inference batches")
  p.add_argument("--budget-s", type=positive_int, default=420)
  p.add_argument("--json-out", help="also write the record here")
  args = p.parse_args(argv)
  import jax

  from g2face_jax.tools import bench
  budget = Budget(args.budget_s)
  kind = jax.devices()[0].device_kind
  record = dict(config=args.config, device=bench.device_name(), device_kind=kind,
                jax=jax.__version__,
                train=train(args.config, bench.parse_batches(args.train_batches,
                                                             "--train-batches"), budget, kind),
                infer=infer(args.config, bench.parse_batches(args.batches), budget))
  record["skipped"] = budget.skipped
  record["wall_s"] = time.perf_counter() - budget.start
  text = json.dumps(record, indent=1)
  print(text)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
