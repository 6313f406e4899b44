"""Converter for the FID InceptionV3: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(the state dict of its FID Inception, a torchvision `Inception3` with 1008 classes and
no auxiliary head) -> `nn.inception.FIDInceptionV3` variables."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from g2face_jax.convert import checkpoint_io, sources
from g2face_jax.convert import table as T
from g2face_jax.convert.table import ConversionError, Rule
from g2face_jax.nn import inception

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
_STEM = r"(Conv2d_\w+)"  # Conv2d_1a_3x3 ... Conv2d_4a_3x3
_BRANCH = r"(Mixed_\w+)\.(\w+)"  # Mixed_6b.branch7x7_2 -> Mixed_6b/branch7x7_2

INCEPTION_RULES = [
    Rule(_STEM + r"\.conv\.weight", r"params/\1/conv/kernel", T.conv_oihw_to_hwio),
    Rule(_BRANCH + r"\.conv\.weight", r"params/\1/\2/conv/kernel", T.conv_oihw_to_hwio),
] + T.batchnorm_rules(_STEM + r"\.bn", r"\1/bn") + T.batchnorm_rules(_BRANCH + r"\.bn", r"\1/\2/bn")
# The 1008-way ImageNet classifier comes after pool3, which is all FID reads.
INCEPTION_IGNORED = T.BATCHNORM_IGNORED + [r"fc\.(weight|bias)"]
_SIGNATURE = "Mixed_7c.branch_pool.conv.weight"


def abstract_variables() -> dict:
  """Shapes of the FIDInceptionV3 variables {'params', 'batch_stats'}."""
  images = jax.ShapeDtypeStruct((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda x: inception.FIDInceptionV3().init(jax.random.key(0), x), images)


def convert_inception(state_dict: Mapping[str, Any], source: str = WEIGHTS_FILE) -> dict:
  """FID Inception state dict (NumPy arrays) -> {'params', 'batch_stats'}; every key is
  used or named as ignored. One-line ConversionError naming `source` and the key otherwise."""
  if not isinstance(state_dict, Mapping) or _SIGNATURE not in state_dict:
    raise ConversionError(f"{source}: expected the FID InceptionV3 state dict ({WEIGHTS_FILE}), "
                          f"found {sources.describe(state_dict)}")
  return T.apply_rules(state_dict, INCEPTION_RULES, abstract_variables(), ignore=INCEPTION_IGNORED,
                       what=source)


def load(path: str | os.PathLike) -> dict:
  """Read `pt_inception-2015-12-05-6726825d.pth` (torch.load weights_only) -> variables."""
  return convert_inception(checkpoint_io.load_state_file(path), os.fspath(path))
