"""Converter for the Deep3DFaceRecon regressor: `ReconNetWrapper('resnet50')` state
dict (`net_recon` of `epoch_20.pth`) -> ReconNet variables."""
from __future__ import annotations

from typing import Any, Mapping

from g2face_jax.convert import table as T
from g2face_jax.convert.table import Rule

_BLOCK = r"backbone\.layer(\d)\.(\d+)"  # -> Flax `backbone/layer{stage}_{block}`


def _head_to_io(w):
  """(out, 2048, 1, 1) 1x1 conv on the pooled features -> (2048, out) linear kernel."""
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    raise T.ConversionError("expected a (out, in, 1, 1) 1x1 convolution")
  return T.linear_to_io(w[:, :, 0, 0])


RECON_NET_RULES = [
    Rule(r"backbone\.conv1\.weight", "params/backbone/conv1/kernel", T.conv_oihw_to_hwio),
    Rule(_BLOCK + r"\.(conv\d)\.weight", r"params/backbone/layer\1_\2/\3/kernel",
         T.conv_oihw_to_hwio),
    Rule(_BLOCK + r"\.downsample\.0\.weight", r"params/backbone/layer\1_\2/downsample_conv/kernel",
         T.conv_oihw_to_hwio),
    Rule(r"final_layers\.(\d)\.weight", r"params/final_layers_\1/kernel", _head_to_io),
    Rule(r"final_layers\.(\d)\.bias", r"params/final_layers_\1/bias"),
] + (T.batchnorm_rules(r"backbone\.bn1", "backbone/bn1")
     + T.batchnorm_rules(_BLOCK + r"\.(bn\d)", r"backbone/layer\1_\2/\3")
     + T.batchnorm_rules(_BLOCK + r"\.downsample\.1", r"backbone/layer\1_\2/downsample_bn"))


def convert_recon_net(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any]) -> dict:
  """ReconNetWrapper state dict (keys `backbone.*`, `final_layers.0..6.*`) -> ReconNet
  variables {'params', 'batch_stats'}. A whole Deep3DFaceRecon checkpoint dict is
  accepted too: its `net_recon` entry is used.

  abstract_variables: `jax.eval_shape(lambda: ReconNet().init(key, x))`.
  """
  if "net_recon" in state_dict:
    state_dict = state_dict["net_recon"]
  return T.apply_rules(state_dict, RECON_NET_RULES, abstract_variables,
                       ignore=T.BATCHNORM_IGNORED, what="Deep3DFaceRecon net_recon")
