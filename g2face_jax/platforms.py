"""Which JAX platforms the `g2face` command starts: keeps libtpu's start-up errors off hosts
that have no TPU chips.

With the `tpu` extra installed (libtpu, for `g2face compile`), JAX tries the TPU runtime
first on every host, and on a host without TPU chips libtpu prints errors about worker
hostnames before JAX falls back to the CPU. When nothing but the CPU can run here (no TPU
chip on the PCI bus, no GPU plugin installed) and the user chose no platforms
(`JAX_PLATFORMS`), the command asks JAX for the CPU directly: the same device, no noise.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os

GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor of Cloud TPU chips


def tpu_chips_present(sysfs: str = "/sys", dev: str = "/dev") -> bool:
  """Whether this host has TPU chips: a Google PCI device, or a TPU device node."""
  for path in glob.glob(os.path.join(sysfs, "bus", "pci", "devices", "*", "vendor")):
    try:
      with open(path, encoding="ascii") as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return bool(glob.glob(os.path.join(dev, "accel*")) or glob.glob(os.path.join(dev, "vfio", "[0-9]*")))


def gpu_plugin_installed() -> bool:
  """Whether a JAX GPU plugin (CUDA or ROCm) is installed: an entry point of the
  `jax_plugins` group or a module of the `jax_plugins` namespace package."""
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return True
  return importlib.util.find_spec("jax_plugins") is not None


def only_cpu_available() -> bool:
  return not gpu_plugin_installed() and not tpu_chips_present()


def use_cpu_when_nothing_else_runs() -> bool:
  """Before JAX starts its backends: select the CPU platform when it is the only one this
  host can run and the user chose none. Returns whether it did."""
  if os.environ.get("JAX_PLATFORMS") or not only_cpu_available():
    return False
  import jax
  jax.config.update("jax_platforms", "cpu")
  return True
