"""LPIPS (VGG-16) converter: a torchvision `vgg16` state dict (trunk) plus the
lpips package's `weights/v0.1/vgg.pth` (heads) -> `nn.lpips.LPIPS` params."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from g2face_jax.convert import table as T
from g2face_jax.convert.table import Rule
from g2face_jax.nn import lpips

# torchvision `vgg16().features` index of each conv, by (block, layer); the
# indices between them are ReLUs and max-pools, which hold no weights.
TORCHVISION_CONV_INDEX = {
    (1, 1): 0, (1, 2): 2,
    (2, 1): 5, (2, 2): 7,
    (3, 1): 10, (3, 2): 12, (3, 3): 14,
    (4, 1): 17, (4, 2): 19, (4, 3): 21,
    (5, 1): 24, (5, 2): 26, (5, 3): 28,
}

VGG16_RULES = [
    rule
    for (block, layer), index in TORCHVISION_CONV_INDEX.items()
    for rule in (
        Rule(rf"features\.{index}\.weight", f"vgg/{lpips.vgg16_conv_name(block, layer)}/kernel",
             T.conv_oihw_to_hwio),
        Rule(rf"features\.{index}\.bias", f"vgg/{lpips.vgg16_conv_name(block, layer)}/bias"),
    )
]
# The ImageNet classifier of torchvision's vgg16 is not part of LPIPS.
VGG16_IGNORED = [r"classifier\.\d+\.(weight|bias)"]

# `linK.model` is Sequential(Dropout, Conv2d(C, 1, 1, bias=False)): (1, C, 1, 1) -> (1, 1, C, 1).
HEAD_RULES = [Rule(r"lin(\d+)\.model\.1\.weight", r"lin\1/kernel", T.conv_oihw_to_hwio)]


def abstract_params() -> dict:
  """Shapes of the LPIPS 'params' (they do not depend on the image size)."""
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda a, b: lpips.LPIPS().init(jax.random.key(0), a, b), image, image)
  return shapes["params"]


def convert_lpips(vgg16: Mapping[str, Any], heads: Mapping[str, Any]) -> dict:
  """torchvision vgg16 state dict (`features.N.weight/bias`; `classifier.*` ignored)
  and lpips v0.1 `vgg.pth` (`lin0..lin4.model.1.weight`) -> LPIPS params."""
  expected = abstract_params()
  trunk = T.apply_rules(vgg16, VGG16_RULES, {"vgg": expected["vgg"]}, ignore=VGG16_IGNORED,
                        what="torchvision vgg16")
  lins = T.apply_rules(heads, HEAD_RULES, {k: v for k, v in expected.items() if k != "vgg"},
                       what="LPIPS vgg.pth")
  return {**trunk, **lins}
