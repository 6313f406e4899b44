"""The CPU as several single-threaded JAX devices, for throughput on batches.

XLA runs a program on one CPU device with its matrix products split over the
cores, but its elementwise work (norms, activations, Winograd transforms) on one
thread. Giving each core a device of its own, running one thread, and a share
of the batch can keep every core busy (`pipeline` splits a batch over all
devices when they divide it; docs/benchmarks.md has the figures). One face at
a time is slower this way (it runs on one core), so this is a choice for batches.
"""
from __future__ import annotations

import os

import jax

EIGEN_SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false"


def split(n: int) -> None:
  """Make this process's CPU `n` JAX devices of one thread each (n=1: leave it as it is).

  Must run before JAX starts its backend (the first array, device query or
  compile); a ValueError if it has started, or if JAX's backend is not the CPU.
  """
  if n < 1:
    raise ValueError(f"--cpu-devices must be >= 1, got {n}")
  if n == 1:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    raise ValueError("--cpu-devices must be set before JAX starts its backend") from None
  flags = os.environ.get("XLA_FLAGS", "")
  if EIGEN_SINGLE_THREAD not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_SINGLE_THREAD}".strip()
  if jax.default_backend() != "cpu":
    raise ValueError(f"--cpu-devices splits the CPU, but JAX runs on {jax.default_backend()} "
                     "(set JAX_PLATFORMS=cpu to bench the CPU)")
  if jax.device_count() != n:
    raise ValueError(f"--cpu-devices {n}: JAX started with {jax.device_count()} CPU devices")
