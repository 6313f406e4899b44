"""The train step compiled for a device mesh: shardings, abstract-then-sharded init,
and global batches from per-process data.

The state is never built whole on one device: `init` runs `jax.eval_shape` first,
derives shardings from the abstract state, then runs the initialiser under
`jax.jit(out_shardings=...)`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from g2face_jax import models
from g2face_jax.train import precision
from g2face_jax.train import remat as remat_lib
from g2face_jax.train import sharding
from g2face_jax.train import state as state_lib
from g2face_jax.train import step as step_lib


@dataclasses.dataclass
class Runtime:
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  nets: models.Networks
  settings: step_lib.Settings
  state_sharding: Any
  frozen_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable  # (state, frozen, images) -> (state, metrics); donates state
  sample_step: Callable  # (state, frozen, images, rng) -> dict


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Join a multi-process run (one process per host) before any JAX computation.

  Without arguments JAX detects the cluster (Cloud TPU VMs, SLURM, Open MPI);
  elsewhere pass all three (coordinator 'HOST:PORT' of process 0).
  """
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def create(config: ml_collections.ConfigDict, steps_per_epoch: int, frozen: dict,
           devices=None) -> Runtime:
  """Mesh, shardings and the jitted steps for `config`; `frozen` (host arrays, from
  `frozen.frozen_variables`) only gives its shapes."""
  mesh = sharding.make_mesh(config.mesh, devices)
  if config.train.global_batch % mesh.size:
    raise ValueError(f"global_batch {config.train.global_batch} is not a multiple of the "
                     f"{mesh.size} devices")
  nets = models.Networks.from_config(config.model, models.TRAINING_NETWORKS)
  settings = step_lib.Settings.from_config(config, steps_per_epoch)
  abstract_state = jax.eval_shape(functools.partial(state_lib.init_state, config),
                                  jax.random.key(0))
  abstract_frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), frozen)
  state_sh = sharding.state_shardings(abstract_state, mesh, config.mesh)
  frozen_sh = sharding.state_shardings(abstract_frozen, mesh, config.mesh)
  batch_sh = sharding.batch_sharding(mesh, config.mesh)
  replicated = sharding.replicated(mesh)
  step_nets = precision.compute_in(remat_lib.remat_networks(nets, config.train.remat),
                                  config.train.compute_dtype)
  train_step = jax.jit(
      sharding.weights_whole_where_used(functools.partial(step_lib.train_step, step_nets,
                                                          settings), mesh),
      in_shardings=(state_sh, frozen_sh, batch_sh),
      out_shardings=(state_sh, replicated), donate_argnums=0)
  sample_step = jax.jit(
      sharding.weights_whole_where_used(functools.partial(step_lib.sample_step, nets), mesh),
      in_shardings=(state_sh, frozen_sh, batch_sh, replicated), out_shardings=replicated)
  return Runtime(config, mesh, nets, settings, state_sh, frozen_sh, batch_sh, train_step,
                 sample_step)


def init_state(rt: Runtime, rng: jax.Array) -> state_lib.TrainState:
  """A fresh train state, created directly in its shardings."""
  init = jax.jit(functools.partial(state_lib.init_state, rt.config), out_shardings=rt.state_sharding)
  return init(rng)


def place_frozen(rt: Runtime, frozen: dict) -> dict:
  """The frozen networks and BFM (host arrays) placed in their shardings."""
  return jax.device_put(frozen, rt.frozen_sharding)


def global_batch(rt: Runtime, local_images: np.ndarray) -> jax.Array:
  """This process's slice (B / process_count, S, S, 3) -> the global sharded batch."""
  b = rt.config.train.global_batch
  return jax.make_array_from_process_local_data(rt.batch_sharding, local_images,
                                                (b,) + local_images.shape[1:])
