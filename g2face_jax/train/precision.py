"""Mixed precision for training: networks compute in bfloat16, the train state stays
float32 (`train.compute_dtype`).

Each network's parameters and floating inputs are cast to the compute dtype when it is
applied and its floating outputs come back as float32, so losses, optimizer, master
weights and BatchNorm running statistics stay float32 and gradients reach the float32
parameters through the casts. Meant for accelerators: XLA's CPU bfloat16 convolutions
are slower than float32 ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from g2face_jax import models, pipeline


def _cast(tree: Any, dtype) -> Any:
  """Floating arrays of `tree` as `dtype`; everything else unchanged."""
  def one(leaf):
    if isinstance(leaf, (jax.Array, jnp.ndarray)) and jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf.astype(dtype)
    return leaf
  return jax.tree.map(one, tree)


@dataclasses.dataclass(frozen=True)
class ComputeIn:
  """`module` applied in `dtype`: `apply(variables, *inputs, **kwargs)` as Flax's, with
  the 'params' collection and the inputs cast to `dtype` and every floating output
  (mutated collections included) cast back to float32."""
  module: Any
  dtype: Any

  def apply(self, variables: dict, *inputs, **kwargs):
    variables = {name: _cast(v, self.dtype) if name == "params" else v
                 for name, v in variables.items()}
    return _cast(self.module.apply(variables, *_cast(inputs, self.dtype), **kwargs),
                 jnp.float32)


def compute_in(nets: models.Networks, dtype: str) -> models.Networks:
  """Every network of `nets` computing in `dtype` ('float32' returns `nets` itself)."""
  if dtype not in pipeline.DTYPES:
    raise ValueError(f"unknown compute dtype '{dtype}' ({', '.join(pipeline.DTYPES)})")
  if dtype == "float32":
    return nets
  return nets.map(lambda module: ComputeIn(module, jnp.dtype(dtype)))
