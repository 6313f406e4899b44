"""Converters for the StyleGAN2-based networks: the G2Face decoder
(`anonymous_net`), the discriminator, and a rosinality StyleGAN2 checkpoint
(`g_ema` into the decoder's synthesis layers, `d` into the discriminator)."""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
from flax import traverse_util

from g2face_jax.convert import table as T
from g2face_jax.convert.table import Rule
from g2face_jax.nn import ops

_SYNTH = r"(conv1|to_rgb1|convs|to_rgbs)((?:\.\d+)?)"  # module, optional '.N' index

SYNTHESIS_RULES = [
    Rule(r"input\.input", "input/input", T.nchw_to_nhwc),
    Rule(_SYNTH + r"\.conv\.weight", r"\1\2/conv/weight", T.modconv_to_hwio),
    Rule(_SYNTH + r"\.conv\.modulation\.weight", r"\1\2/conv/modulation/weight", T.linear_to_io),
    Rule(_SYNTH + r"\.conv\.modulation\.bias", r"\1\2/conv/modulation/bias"),
    Rule(_SYNTH + r"\.noise\.weight", r"\1\2/noise/weight"),
    Rule(_SYNTH + r"\.activate\.bias", r"\1\2/activate/bias"),
    Rule(_SYNTH + r"\.bias", r"\1\2/bias", T.flatten),  # ToRGB (1,3,1,1)
]
SYNTHESIS_CONSTANTS = [r".*\.blur\.kernel", r".*\.upsample\.kernel"]

DECODER_RULES = SYNTHESIS_RULES + [
    Rule(r"hiding_injects\.(\d+)\.weight", r"hiding_injects.\1/weight", T.flatten),
    Rule(r"hiding_injects\.(\d+)\.conv\.weight", r"hiding_injects.\1/conv/kernel", T.conv_oihw_to_hwio),
    Rule(r"hiding_injects\.(\d+)\.conv\.bias", r"hiding_injects.\1/conv/bias"),
    Rule(r"hiding_injects\.(\d+)\.activate\.bias", r"hiding_injects.\1/activate/bias"),
    Rule(r"pyramid\.(\d+)\.(conv1|conv2|skip)\.conv\.weight", r"pyramid.\1/\2/conv/kernel",
         T.conv_oihw_to_hwio),
    Rule(r"pyramid\.(\d+)\.(conv1|conv2|skip)\.conv\.bias", r"pyramid.\1/\2/conv/bias"),
    Rule(r"fusion_mask\.(\d+)\.conv\.weight", r"fusion_mask.\1/conv/kernel", T.conv_oihw_to_hwio),
    Rule(r"fusion_mask\.(\d+)\.conv\.bias", r"fusion_mask.\1/conv/bias"),
]

# rosinality `g_ema` parts that G2Face does not use: the mapping network and noise buffers.
STYLEGAN2_G_IGNORED = [r"style\..*", r"noises\.noise_\d+"] + SYNTHESIS_CONSTANTS


def _discriminator_rules(final_channels: int) -> list[Rule]:
  return [
      Rule(r"convs\.0\.0\.weight", "convs.0/conv/weight", T.conv_oihw_to_hwio),
      Rule(r"convs\.0\.1\.bias", "convs.0/activate/bias"),
      Rule(r"convs\.(\d+)\.conv1\.0\.weight", r"convs.\1/conv1/conv/weight", T.conv_oihw_to_hwio),
      Rule(r"convs\.(\d+)\.conv1\.1\.bias", r"convs.\1/conv1/activate/bias"),
      Rule(r"convs\.(\d+)\.conv2\.1\.weight", r"convs.\1/conv2/conv/weight", T.conv_oihw_to_hwio),
      Rule(r"convs\.(\d+)\.conv2\.2\.bias", r"convs.\1/conv2/activate/bias"),
      Rule(r"convs\.(\d+)\.skip\.1\.weight", r"convs.\1/skip/conv/weight", T.conv_oihw_to_hwio),
      Rule(r"final_conv\.0\.weight", "final_conv/conv/weight", T.conv_oihw_to_hwio),
      Rule(r"final_conv\.1\.bias", "final_conv/activate/bias"),
      Rule(r"final_linear\.0\.weight", "final_linear.0/weight",
           T.linear_reading_nchw_flatten(final_channels, 4, 4)),
      Rule(r"final_linear\.0\.bias", "final_linear.0/bias"),
      Rule(r"final_linear\.1\.weight", "final_linear.1/weight", T.linear_to_io),
      Rule(r"final_linear\.1\.bias", "final_linear.1/bias"),
  ]


DISCRIMINATOR_CONSTANTS = [r"convs\.\d+\.(conv2|skip)\.0\.kernel"]


def _flax_names(tree: Mapping[str, Any]) -> dict:
  """Flax list names ('convs_3') -> the dotted form the rules target ('convs.3')."""
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict(
      {tuple(re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in k): v for k, v in flat.items()})


def _to_flax_names(tree: Mapping[str, Any]) -> dict:
  flat = traverse_util.flatten_dict(tree)
  return traverse_util.unflatten_dict(
      {tuple(p.replace(".", "_") for p in k): v for k, v in flat.items()})


def convert_decoder(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any],
                    blur_taps=(1, 3, 3, 1)) -> dict:
  """G2Face `anonymous_net` state dict -> Decoder variables {'params'}.

  abstract_variables: `jax.eval_shape` of the target Decoder's init.
  """
  what = "G2Face anonymous_net"
  T.check_constant(state_dict, r".*\.blur\.kernel", ops.fir_kernel_2d(blur_taps, 4.0), what)
  T.check_constant(state_dict, r".*\.upsample\.kernel", ops.fir_kernel_2d(blur_taps, 4.0), what)
  params = T.apply_rules(state_dict, DECODER_RULES, _flax_names(abstract_variables["params"]),
                         ignore=SYNTHESIS_CONSTANTS, what=what)
  return {"params": _to_flax_names(params)}


def convert_discriminator(state_dict: Mapping[str, Any], abstract_variables: Mapping[str, Any],
                          blur_taps=(1, 3, 3, 1), what: str = "G2Face discriminator") -> dict:
  """Discriminator state dict (G2Face or rosinality `d`) -> Discriminator variables {'params'}."""
  T.check_constant(state_dict, DISCRIMINATOR_CONSTANTS[0], ops.fir_kernel_2d(blur_taps), what)
  expected = abstract_variables["params"]
  final_channels = expected["final_conv"]["conv"]["weight"].shape[-1]
  params = T.apply_rules(state_dict, _discriminator_rules(final_channels),
                         _flax_names(expected), ignore=DISCRIMINATOR_CONSTANTS, what=what)
  return {"params": _to_flax_names(params)}


def stylegan2_into_decoder(g_ema: Mapping[str, Any], decoder_variables: Mapping[str, Any],
                           blur_taps=(1, 3, 3, 1)) -> dict:
  """Load a rosinality `g_ema` into the decoder's synthesis layers (the official
  non-strict load); the G2Face-only parts of `decoder_variables` are kept."""
  what = "StyleGAN2 g_ema"
  T.check_constant(g_ema, r".*\.blur\.kernel", ops.fir_kernel_2d(blur_taps, 4.0), what)
  T.check_constant(g_ema, r".*\.upsample\.kernel", ops.fir_kernel_2d(blur_taps, 4.0), what)
  named = _flax_names(decoder_variables["params"])
  synthesis = {k: v for k, v in named.items()
               if k.split(".")[0] in ("input", "conv1", "to_rgb1", "convs", "to_rgbs")}
  loaded = T.apply_rules(g_ema, SYNTHESIS_RULES, synthesis, ignore=STYLEGAN2_G_IGNORED, what=what)
  merged = traverse_util.flatten_dict(named)
  merged.update(traverse_util.flatten_dict(loaded))
  return {"params": _to_flax_names(traverse_util.unflatten_dict(merged))}


def abstract(module, *args, **kwargs) -> dict:
  """Shapes of a module's variables without materialising them."""
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
