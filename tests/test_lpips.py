"""LPIPS (VGG-16) against an independent PyTorch reference, its metric
properties, and the converter's error cases.

There is no official fixture (torchvision has no CPU build here), so the
reference below rebuilds the lpips package's forward from its definition with
plain torch.nn.functional ops in float64, walking torchvision's `features`
layer list and cutting it where lpips does (after indices 3, 8, 15, 22, 29).
Both sides get the same random state dicts in the torchvision / lpips layout.
"""
import re

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from g2face_jax.convert import lpips as convert
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn import lpips

from conftest import nhwc, rel_err

# torchvision vgg16 (config 'D') `features`: conv widths, 'M' = max-pool; each conv is followed by a ReLU.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
LPIPS_CUTS = (3, 8, 15, 22, 29)  # last `features` index of each lpips slice
SHIFT = [-0.030, -0.088, -0.188]
SCALE = [0.458, 0.448, 0.450]
BATCH = 2


def torchvision_layers():
  """[(kind, in, out)] for every index of torchvision's vgg16 `features`."""
  layers, c = [], 3
  for v in VGG16_CFG:
    if v == "M":
      layers.append(("pool", c, c))
    else:
      layers += [("conv", c, v), ("relu", v, v)]
      c = v
  return layers


def random_state_dicts(seed):
  """(torchvision vgg16 state dict, lpips vgg.pth dict) of random float32 arrays.

  Conv weights are He-scaled so activations keep their size through 13 layers;
  head weights are non-negative, as the lpips training clamps them.
  """
  rng = np.random.default_rng(seed)
  vgg, heads = {}, {}
  for i, (kind, cin, cout) in enumerate(torchvision_layers()):
    if kind == "conv":
      vgg[f"features.{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3))
                                     * np.sqrt(2.0 / (9 * cin))).astype(np.float32)
      vgg[f"features.{i}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
  for j in (0, 3, 6):  # the ImageNet classifier (tiny stand-ins: its keys are ignored)
    vgg[f"classifier.{j}.weight"] = rng.standard_normal((4, 4)).astype(np.float32)
    vgg[f"classifier.{j}.bias"] = rng.standard_normal(4).astype(np.float32)
  for k, c in enumerate((64, 128, 256, 512, 512)):
    heads[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, c, 1, 1))).astype(np.float32)
  return vgg, heads


def reference_lpips(vgg, heads, x0, x1):
  """lpips.LPIPS(net='vgg', version='0.1') forward in float64; x NCHW in [-1, 1] (arrays or
  tensors) -> (B,) tensor."""
  t = lambda a: torch.as_tensor(a, dtype=torch.float64)
  shift, scale = t(SHIFT).view(1, 3, 1, 1), t(SCALE).view(1, 3, 1, 1)

  def features(x):
    h, cuts = (t(x) - shift) / scale, []
    for i, (kind, _, _) in enumerate(torchvision_layers()[:LPIPS_CUTS[-1] + 1]):
      if kind == "conv":
        h = F.conv2d(h, t(vgg[f"features.{i}.weight"]), t(vgg[f"features.{i}.bias"]), padding=1)
      elif kind == "relu":
        h = F.relu(h)
      else:
        h = F.max_pool2d(h, 2, 2)
      if i in LPIPS_CUTS:
        cuts.append(h)
    return cuts

  total = 0.0
  for k, (f0, f1) in enumerate(zip(features(x0), features(x1))):
    n0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
    n1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
    total = total + F.conv2d((n0 - n1) ** 2, t(heads[f"lin{k}.model.1.weight"])).mean(dim=(2, 3))
  return total.reshape(-1)


@pytest.fixture(scope="module")
def weights():
  return random_state_dicts(seed=1234)


@pytest.fixture(scope="module")
def params(weights):
  return convert.convert_lpips(*weights)


@pytest.fixture(scope="module")
def distance(params):
  fn = jax.jit(lambda a, b: lpips.LPIPS().apply({"params": params}, a, b))
  return lambda a, b: np.asarray(fn(a, b))


def images(rng, h, w):
  """A pair of NCHW batches in [-1, 1]: unrelated images, and a lightly perturbed copy."""
  x0 = rng.uniform(-1, 1, (BATCH, 3, h, w)).astype(np.float32)
  x1 = rng.uniform(-1, 1, (BATCH, 3, h, w)).astype(np.float32)
  x1[1] = np.clip(x0[1] + 0.05 * rng.standard_normal((3, h, w)), -1, 1)
  return x0, x1


@pytest.mark.parametrize("h, w", [(64, 64), (56, 44)])  # 56x44 floors odd sizes at the pools
def test_matches_reference(weights, distance, h, w):
  x0, x1 = images(np.random.default_rng(h * w), h, w)
  ours = distance(nhwc(x0), nhwc(x1))
  ref = reference_lpips(*weights, x0, x1).numpy()
  assert ours.shape == (BATCH,)
  errs = [rel_err(ours[i], ref[i]) for i in range(BATCH)]  # each pair, the close one too
  print(f"lpips {h}x{w}: rel_err per pair {['%.2e' % e for e in errs]} (ours {ours}, ref {ref})")
  assert max(errs) <= 1e-4


def test_gradient_matches_reference(weights, params):
  """d distance / d x0, what training back-propagates, against torch autograd."""
  x0, x1 = images(np.random.default_rng(3), 32, 32)
  grad = jax.jit(jax.grad(lambda a, b: lpips.LPIPS().apply({"params": params}, a, b).sum()))
  ours = np.transpose(np.asarray(grad(nhwc(x0), nhwc(x1))), (0, 3, 1, 2))
  x0_ref = torch.from_numpy(x0.astype(np.float64)).requires_grad_()
  reference_lpips(*weights, x0_ref, x1).sum().backward()
  err = rel_err(ours, x0_ref.grad.numpy())
  print(f"lpips gradient 32x32: rel_err {err:.2e}")
  assert err <= 1e-4


def test_metric_properties(distance):
  x0, x1 = (nhwc(a) for a in images(np.random.default_rng(7), 64, 64))
  # XLA may order equivalent float ops differently for the two images (their batch
  # positions), so equal images give features equal only to float32 rounding (~1e-7
  # relative) and a distance of its square, against O(1) for different images.
  assert np.all(np.abs(distance(x0, x0)) <= 1e-12)
  d01, d10 = distance(x0, x1), distance(x1, x0)
  np.testing.assert_allclose(d01, d10, rtol=1e-6)
  assert np.all(d01 > 0)
  assert d01[1] < d01[0]  # the perturbed copy is closer than the unrelated image


def test_params_layout(params):
  assert set(params) == {"vgg", "lin0", "lin1", "lin2", "lin3", "lin4"}
  assert params["vgg"]["conv5_3"]["kernel"].shape == (3, 3, 512, 512)
  assert params["lin2"]["kernel"].shape == (1, 1, 256, 1)


def test_rejects_mismatched_images(params):
  with pytest.raises(ValueError, match="one shape"):
    lpips.LPIPS().apply({"params": params}, np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 16, 3)))


# A missing weight is reported by its Flax path; any other fault by the official key.
@pytest.mark.parametrize("which, edit, key, named", [
    ("vgg", "drop", "features.28.bias", "vgg/conv5_3/bias"),
    ("vgg", "reshape", "features.0.weight", "features.0.weight"),
    ("vgg", "add", "features.31.weight", "features.31.weight"),
    ("heads", "drop", "lin3.model.1.weight", "lin3/kernel"),
    ("heads", "reshape", "lin0.model.1.weight", "lin0.model.1.weight"),
    ("heads", "add", "lin5.model.1.weight", "lin5.model.1.weight"),
    ("heads", "add", "scaling_layer.shift", "scaling_layer.shift"),
])
def test_converter_errors(weights, which, edit, key, named):
  vgg, heads = (dict(d) for d in weights)
  target = vgg if which == "vgg" else heads
  if edit == "drop":
    del target[key]
  elif edit == "reshape":
    target[key] = target[key][:, :-1]
  else:
    target[key] = np.zeros((1, 8, 1, 1), np.float32)
  with pytest.raises(ConversionError, match=re.escape(named)):
    convert.convert_lpips(vgg, heads)
