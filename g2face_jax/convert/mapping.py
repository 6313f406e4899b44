"""Converters for the small G2Face networks: the style mapper (`style_mlp`), the
dummy-identity net (`map_2_id`) and the password extractor (`hiding_extractor`).

Each takes the official state dict and the model's abstract variables
(`jax.eval_shape(lambda: model.init(...))`) and returns the Flax variables:
'params', plus 'batch_stats' where the network has BatchNorm.
"""
from __future__ import annotations

from typing import Any, Mapping

from g2face_jax.convert import table as T
from g2face_jax.convert.table import Rule

STYLE_MLP_RULES = [
    Rule(r"(style_low|style_middle|style_high)\.(\d+)\.weight", r"params/\1_\2/weight",
         T.linear_to_io),
    Rule(r"(style_low|style_middle|style_high)\.(\d+)\.bias", r"params/\1_\2/bias"),
]

MAP_2_ID_RULES = [
    Rule(r"map_2_id\.0\.weight", "params/fc1/kernel", T.linear_to_io),
    Rule(r"map_2_id\.0\.bias", "params/fc1/bias"),
    Rule(r"map_2_id\.2\.weight", "params/fc2/kernel", T.linear_to_io),
    Rule(r"map_2_id\.2\.bias", "params/fc2/bias"),
] + T.batchnorm_rules(r"map_2_id\.4", "bn")

HIDING_EXTRACTOR_RULES = [
    Rule(r"(conv1x1_input|conv1x1_output)\.weight", r"params/\1/kernel", T.conv_oihw_to_hwio),
    Rule(r"(conv1x1_input|conv1x1_output)\.bias", r"params/\1/bias"),
    Rule(r"body\.(\d+)\.(conv\w+)\.weight", r"params/body_\1/\2/kernel", T.conv_oihw_to_hwio),
    Rule(r"body\.(\d+)\.(conv\w+)\.bias", r"params/body_\1/\2/bias"),
] + T.batchnorm_rules(r"body\.(\d+)\.(bn\w+)", r"body_\1/\2")


def convert_style_mlp(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any]) -> dict:
  """`style_mlp` state dict -> StyleMapper variables {'params'}."""
  return T.apply_rules(state_dict, STYLE_MLP_RULES, abstract_variables,
                       what="G2Face style_mlp")


def convert_map_2_id(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any]) -> dict:
  """`map_2_id` state dict -> Map2ID variables {'params', 'batch_stats'}."""
  return T.apply_rules(state_dict, MAP_2_ID_RULES, abstract_variables, ignore=T.BATCHNORM_IGNORED,
                       what="G2Face map_2_id")


def convert_hiding_extractor(state_dict: Mapping[str, Any],
                             abstract_variables: Mapping[str, Any]) -> dict:
  """`hiding_extractor` state dict -> PasswordExtractor variables {'params', 'batch_stats'}."""
  return T.apply_rules(state_dict, HIDING_EXTRACTOR_RULES, abstract_variables,
                       ignore=T.BATCHNORM_IGNORED, what="G2Face hiding_extractor")
