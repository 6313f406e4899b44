"""Throughput of the official anonymize and recover paths on random weights.

`run(config, batch, dtype=...)` builds every network of the config with fresh
variables (`models.init_variables`), times the official anonymize and recover
chains (`pipeline.official_anonymize` / `official_recover`, one jitted program
each, through `pipeline.Stages` as the API and CLI run them) in the compute dtype (float32, the official computation, or bfloat16) and matmul
precision (float32, or TF32 on GPUs) on random crops and returns one flat dict:
compile time apart from run time (the first call compiles), the best steady run of `rounds`,
seconds and images per second per image, XLA's FLOP count of each jitted
official chain (`Lowered.cost_analysis`) and the achieved GFLOP/s, the process's peak
resident memory and the device.

`run_train(config)` times the whole training iteration (anonymize, recover and
discriminator updates, sharded over this process's devices as in `g2face
train`), with XLA's FLOP count and per-device memory of the compiled step.
`scaling(config, devices)` runs it in fresh processes on 1, 2, ... simulated
CPU devices (`--xla_force_host_platform_device_count`).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from g2face_jax import config as config_lib
from g2face_jax import models, pipeline
from g2face_jax.tools import host_memory
from g2face_jax.nn import decoder


def device_name() -> str:
  """'cpu: <model name> (N cores)' on CPU, else the JAX platform and device kind."""
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{dev.platform}: {dev.device_kind} x{jax.device_count()}"
  model = dev.device_kind
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                   model)
  except OSError:
    pass
  return f"cpu: {model} ({len(os.sched_getaffinity(0))} cores)"


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _timed(fn: Callable[[], dict], rounds: int) -> tuple[dict, float, float]:
  """(output, first-call seconds, best of `rounds` later calls), waiting for every output."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, first, best


def _flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of `fn(nets, *args)` traced as one program (nested jits included).

  Counted on the program lowered for CPU, whatever the device: GPU backends give
  no count before compiling and leave library convolutions out after it.
  """
  lowered = jax.jit(fn, static_argnums=0).trace(*args).lower(lowering_platforms=("cpu",))
  return float((lowered.cost_analysis() or {}).get("flops", 0.0))


def run(config: str = "paper", batch: int = 1, rounds: int = 3, seed: int = 0,
        dtype: str = "float32", micro_batch: int | None = None,
        matmul_precision: str = "float32") -> dict:
  """Bench one configuration; returns a flat dict (seconds, GFLOP, MB; see the module doc).

  `micro_batch`: faces per step of the pipeline's loop over the batch (None: the
  pipeline default); the record holds the value the decoder and the extractor
  used (`micro_batch`) and the one ArcFace and the 3DMM net used
  (`small_nets_micro_batch`), and `devices` the number of devices sharing the
  batch (`pipeline.data_parallel_devices`).
  `matmul_precision`: 'float32' (the pipeline's own) or 'tensorfloat32' (TF32 on GPUs).
  """
  if matmul_precision not in ("float32", "tensorfloat32"):
    raise ValueError(f"--matmul-precision '{matmul_precision}': choose float32 or tensorfloat32")
  precision = (contextlib.nullcontext() if matmul_precision == "float32"  # the pipeline's own
               else jax.default_matmul_precision(matmul_precision))
  with precision:
    return _run(config, batch, rounds, seed, dtype, micro_batch, matmul_precision)


def _run(config: str, batch: int, rounds: int, seed: int, dtype: str,
         micro_batch: int | None, matmul_precision: str) -> dict:
  if batch < 1 or rounds < 1:
    raise ValueError(f"batch and rounds must be >= 1, got batch={batch}, rounds={rounds}")
  if dtype not in pipeline.DTYPES:
    raise ValueError(f"--dtype '{dtype}': choose from {', '.join(pipeline.DTYPES)}")
  devices = pipeline.data_parallel_devices(batch)
  per_device = batch // devices
  try:
    micro = pipeline.faces_per_step(micro_batch, per_device)
    small_nets_micro = pipeline.faces_per_step(micro_batch, per_device,
                                               pipeline.SMALL_NETS_CPU_FACES)
  except ValueError as e:
    raise ValueError(f"--micro-batch {micro_batch}: {e}") from None
  anonymize = functools.partial(pipeline.official_anonymize, dtype=dtype)
  recover = functools.partial(pipeline.official_recover, dtype=dtype)
  model = config_lib.load(config).model
  nets = models.Networks.from_config(model)
  keys = jax.random.split(jax.random.key(seed), 4)
  variables = models.init_variables(model, keys[0], names=models.INFERENCE_NETWORKS)
  x = jax.random.uniform(keys[1], (batch, model.size, model.size, 3), jnp.float32, -1.0, 1.0)
  z = jax.random.normal(keys[2], (batch, model.identity_dim), jnp.float32)
  noise = [jax.random.normal(k, s, jnp.float32) for k, s in
           zip(jax.random.split(keys[3], len(decoder.noise_shapes(model.size, batch))),
               decoder.noise_shapes(model.size, batch))]

  stages = pipeline.Stages(nets, jax.device_put(variables), dtype=dtype, micro_batch=micro_batch)
  anonymize_now = lambda: stages.official_anonymize(x, z, noise)
  recover_now = lambda anon, bits: stages.official_recover(anon, bits, noise)
  anon_out, anon_first, anon_best = _timed(anonymize_now, rounds)
  anon, hide_bits = anon_out["anon"], anon_out["hide_bits"]
  _, rec_first, rec_best = _timed(lambda: recover_now(anon, hide_bits), rounds)
  # Counted on the one-step program: XLA counts a loop's body once, and the
  # per-sample loop (pipeline micro_batch) does the same arithmetic. Split over
  # devices, the program's networks hold one device's share of the batch.
  anon_flops = devices * _flops(functools.partial(anonymize, micro_batch=per_device), nets,
                                variables, x, z, noise)
  rec_flops = devices * _flops(functools.partial(recover, micro_batch=per_device), nets,
                               variables, anon, hide_bits, noise)
  return dict(
      config=config, size=int(model.size), batch=batch, micro_batch=micro,
      small_nets_micro_batch=small_nets_micro, rounds=rounds,
      dtype=dtype, matmul_precision=matmul_precision, device=device_name(), devices=devices,
      reuse_freed_memory=host_memory.applied(), huge_pages=host_memory.huge_pages_active(),
      anonymize_s_per_img=anon_best / batch, recover_s_per_img=rec_best / batch,
      anonymize_img_per_s=batch / anon_best, recover_img_per_s=batch / rec_best,
      anonymize_compile_s=max(anon_first - anon_best, 0.0),
      recover_compile_s=max(rec_first - rec_best, 0.0),
      anonymize_gflop_per_img=anon_flops / batch / 1e9,
      recover_gflop_per_img=rec_flops / batch / 1e9,
      anonymize_gflop_per_s=anon_flops / anon_best / 1e9,
      recover_gflop_per_s=rec_flops / rec_best / 1e9,
      peak_rss_mb=_peak_rss_mb())


def run_train(config: str = "smoke", rounds: int = 3, seed: int = 0) -> dict:
  """Bench the train step of `config` on all devices (its mesh section; the timed
  iterations are 1 .. rounds + 1, none of them an R1 iteration unless r1_every <= that)."""
  from g2face_jax.train import frozen as frozen_lib
  from g2face_jax.train import runtime
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  cfg = config_lib.load(config)
  frozen_host = frozen_lib.frozen_variables(cfg, seed + 1)
  rt = runtime.create(cfg, steps_per_epoch=1000, frozen=frozen_host)
  state = runtime.init_state(rt, jax.random.key(seed))
  frozen = runtime.place_frozen(rt, frozen_host)
  b, s = cfg.train.global_batch, cfg.model.size
  images = jax.device_put(jax.random.uniform(jax.random.key(seed + 1), (b, s, s, 3), jnp.float32,
                                             -1.0, 1.0), rt.batch_sharding)
  start = time.perf_counter()
  compiled = rt.train_step.lower(state, frozen, images).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(rounds + 1):  # the first run also pays for the first-touch of buffers
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, images)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  best = min(times[1:])
  # XLA's count is of one device's program (SPMD): the step's FLOPs are that times the devices
  flops = float((compiled.cost_analysis() or {}).get("flops", 0.0)) * jax.device_count()
  memory = compiled.memory_analysis()
  return dict(
      config=config, size=int(s), global_batch=int(b), devices=jax.device_count(),
      mesh=dict(rt.mesh.shape), rounds=rounds, device=device_name(),
      reuse_freed_memory=host_memory.applied(), huge_pages=host_memory.huge_pages_active(),
      train_step_s=best, train_img_per_s=b / best, train_compile_s=compile_s,
      train_gflop_per_step=flops / 1e9, train_gflop_per_s=flops / best / 1e9,
      argument_mb_per_device=memory.argument_size_in_bytes / 2 ** 20 if memory else None,
      temp_mb_per_device=memory.temp_size_in_bytes / 2 ** 20 if memory else None,
      peak_rss_mb=_peak_rss_mb())


def scaling(config: str, devices: Sequence[int], rounds: int = 3) -> list[dict]:
  """`run_train` in a fresh process per device count (simulated CPU devices)."""
  results = []
  for n in devices:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={n}".strip())
    cmd = [sys.executable, "-m", "g2face_jax.cli", "bench", "--train", "--config", config,
           "--rounds", str(rounds), "--json"]
    if host_memory.applied():
      cmd.append("--reuse-freed-memory")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
      last = (done.stderr.strip().splitlines() or ["no message"])[-1]
      raise ChildProcessError(f"train bench on {n} devices failed: {last}")
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  return results


def format_train_result(r: dict) -> str:
  """A few human-readable lines for one `run_train` result."""
  return (f"{r['config']} ({r['size']}x{r['size']}) train step, global batch {r['global_batch']}, "
          f"{r['devices']} device(s) mesh {r['mesh']}, best of {r['rounds']}, {r['device']}\n"
          f"  {r['train_step_s'] * 1e3:9.1f} ms/step  {r['train_img_per_s']:7.2f} img/s  "
          f"{r['train_gflop_per_step']:8.1f} GFLOP/step  {r['train_gflop_per_s']:6.1f} GFLOP/s  "
          f"compile {r['train_compile_s']:6.1f} s\n"
          f"  per device: arguments {r['argument_mb_per_device']:.0f} MB, temporaries "
          f"{r['temp_mb_per_device']:.0f} MB; peak resident memory {r['peak_rss_mb']:.0f} MB")


def format_result(r: dict) -> str:
  """A few human-readable lines for one `run` result."""
  share = f" on {r['devices']} devices" if r["devices"] > 1 else ""
  lines = [f"{r['config']} ({r['size']}x{r['size']}), batch {r['batch']}{share} "
           f"({r['micro_batch']} per step), {r['dtype']}, {r['matmul_precision']} matmuls, "
           f"best of {r['rounds']}, "
           f"{r['device']}"]
  for path in ("anonymize", "recover"):
    lines.append(
        f"  {path:9s} {r[f'{path}_s_per_img'] * 1e3:9.1f} ms/img  {r[f'{path}_img_per_s']:7.2f} img/s"
        f"  {r[f'{path}_gflop_per_img']:7.1f} GFLOP/img  {r[f'{path}_gflop_per_s']:6.1f} GFLOP/s"
        f"  compile {r[f'{path}_compile_s']:6.1f} s")
  memory = [note for key, note in (("huge_pages", "huge pages"),
                                    ("reuse_freed_memory", "freed memory reused")) if r[key]]
  lines.append(f"  peak resident memory of the process {r['peak_rss_mb']:.0f} MB"
               f"{' (' + ', '.join(memory) + ')' if memory else ''}")
  return "\n".join(lines)


def parse_batches(text: str, option: str = "--batch") -> list[int]:
  """'1,4' -> [1, 4]; a clear error naming `option` on anything else."""
  try:
    batches = [int(b) for b in text.split(",") if b.strip()]
  except ValueError:
    raise ValueError(f"{option} '{text}': expected comma-separated positive integers") from None
  if not batches or min(batches) < 1:
    raise ValueError(f"{option} '{text}': expected comma-separated positive integers")
  return batches

