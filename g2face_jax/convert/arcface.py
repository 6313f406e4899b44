"""Converter for the ArcFace identity encoder: an insightface `iresnet50` /
`iresnet100` state dict (e.g. `ms1mv3_arcface_r50.pth`) -> IResNet variables."""
from __future__ import annotations

from typing import Any, Mapping

from g2face_jax.convert import table as T
from g2face_jax.convert.table import Rule

_BLOCK = r"layer(\d)\.(\d+)"  # official `layer{stage}.{block}` -> Flax `layer{stage}_{block}`


ARCFACE_RULES = [
    Rule(r"conv1\.weight", "params/conv1/kernel", T.conv_oihw_to_hwio),
    Rule(r"prelu\.weight", "params/prelu/slope"),
    Rule(_BLOCK + r"\.(conv\d)\.weight", r"params/layer\1_\2/\3/kernel", T.conv_oihw_to_hwio),
    Rule(_BLOCK + r"\.prelu\.weight", r"params/layer\1_\2/prelu/slope"),
    Rule(_BLOCK + r"\.downsample\.0\.weight", r"params/layer\1_\2/downsample_conv/kernel",
         T.conv_oihw_to_hwio),
    Rule(r"fc\.weight", "params/fc/kernel", T.linear_reading_nchw_flatten(512, 7, 7)),
    Rule(r"fc\.bias", "params/fc/bias"),
] + (T.batchnorm_rules(r"(bn\d|features)", r"\1")
     + T.batchnorm_rules(_BLOCK + r"\.(bn\d)", r"layer\1_\2/\3")
     + T.batchnorm_rules(_BLOCK + r"\.downsample\.1", r"layer\1_\2/downsample_bn"))


def convert_arcface(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any]) -> dict:
  """iresnet state dict -> IResNet variables {'params', 'batch_stats'}.

  abstract_variables: `jax.eval_shape(lambda: model.init(key, x))` of the target IResNet;
  an iresnet100 checkpoint needs `IResNet(layers=IRESNET100)`.
  """
  return T.apply_rules(state_dict, ARCFACE_RULES, abstract_variables,
                       ignore=T.BATCHNORM_IGNORED, what="ArcFace iresnet")
