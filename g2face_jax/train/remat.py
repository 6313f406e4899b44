"""Rematerialisation of the training networks: keep fewer activations for the backward
pass and recompute the rest (`train.remat` in the config, `g2face compile --remat`)."""
from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax

from g2face_jax import models

POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_networks(nets: models.Networks, policy: str) -> models.Networks:
  """Every network's forward rematerialised in the backward pass ('full': keep only each
  network's inputs; else the named `jax.checkpoint_policies` policy). Same variables,
  same results; 'none' returns `nets` itself."""
  if policy not in POLICIES:
    raise ValueError(f"unknown remat policy '{policy}' ({', '.join(POLICIES)})")
  if policy == "none":
    return nets
  chosen = None if policy == "full" else getattr(jax.checkpoint_policies, policy)

  def wrap(module):
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
              if f.init and f.name not in ("parent", "name")}
    if "train" not in inspect.signature(type(module).__call__).parameters:
      return nn.remat(type(module), policy=chosen)(**fields)
    rematted = nn.remat(type(module), policy=chosen, static_argnums=(2,))

    class TrainPositional(rematted):  # `train=` (a Python bool) reaches remat as static
      def __call__(self, x, train: bool = False):
        return super().__call__(x, train)

    return TrainPositional(**fields)

  return nets.map(wrap)
