"""Device mesh and shardings: a ('data', 'fsdp') mesh, logical axis rules from the config.

The batch is split over both mesh axes (logical axis 'batch'); every array of
the train state with at least `fsdp_min_size` elements is split over 'fsdp'
along its largest dimension that the fsdp size divides (logical axis
'params'); the rest is replicated. The same code serves 1 device, N devices
and several hosts.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh of shape (data, fsdp) over `devices` (default: all); data = -1 takes the rest."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  n, fsdp = devices.size, mesh_cfg.fsdp
  data = n // fsdp if mesh_cfg.data == -1 else mesh_cfg.data
  if fsdp < 1 or data * fsdp != n:
    raise ValueError(f"mesh data={mesh_cfg.data} x fsdp={fsdp} does not fit {n} devices")
  return Mesh(devices.reshape(data, fsdp), MESH_AXES)


def _rules(mesh_cfg) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in mesh_cfg.axis_rules)


def logical_sharding(mesh: Mesh, mesh_cfg, logical_axes: tuple) -> NamedSharding:
  """NamedSharding of an array whose dimensions carry `logical_axes` (names or None)."""
  spec = nn.logical_to_mesh_axes(logical_axes, _rules(mesh_cfg))
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, mesh_cfg, ndim: int = 4) -> NamedSharding:
  """Leading (batch) dimension split over the rule for 'batch'."""
  return logical_sharding(mesh, mesh_cfg, ("batch",) + (None,) * (ndim - 1))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def weights_whole_where_used(step: Callable, mesh: Mesh) -> Callable:
  """`step(state, frozen, images, ...)` with the network weights (generator side,
  discriminator, frozen networks) gathered whole on every device inside the program:
  weights are stored split over 'fsdp' and used whole, so every network's
  activations keep the batch split over both mesh axes. Without it the partitioner
  may follow a split weight instead and replicate the batch over 'fsdp' (16x the
  activations per chip on a 16 x 16 mesh). Gradients return to the split layout
  through the step's output shardings. Values are unchanged."""
  whole = replicated(mesh)

  def gathered(state, frozen, images, *rest):
    state = state.replace(params=jax.lax.with_sharding_constraint(state.params, whole),
                          disc_params=jax.lax.with_sharding_constraint(state.disc_params, whole))
    return step(state, jax.lax.with_sharding_constraint(frozen, whole), images, *rest)

  return gathered


def param_logical_axes(shape: tuple[int, ...], fsdp: int, min_size: int) -> tuple:
  """Logical axes of one state array: 'params' on its largest dimension divisible by
  `fsdp` when the array has >= min_size elements, else all None (replicated)."""
  axes = [None] * len(shape)
  if fsdp > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size:
    candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
    if candidates:
      axes[max(candidates, key=lambda d: shape[d])] = "params"
  return tuple(axes)


def state_shardings(abstract_tree: Any, mesh: Mesh, mesh_cfg) -> Any:
  """Shardings for a pytree of arrays / ShapeDtypeStructs (train state, frozen nets)."""
  fsdp = mesh.shape["fsdp"]

  def one(leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    return logical_sharding(mesh, mesh_cfg, param_logical_axes(shape, fsdp, mesh_cfg.fsdp_min_size))

  return jax.tree.map(one, abstract_tree)
