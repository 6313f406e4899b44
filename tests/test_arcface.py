"""ArcFace (insightface iresnet) parity with the official network, resize rule, converter checks."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, nhwc, rel_err

from g2face_jax.convert import recipe
from g2face_jax.convert.arcface import convert_arcface
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn.arcface import (INPUT_SIZE, IRESNET50, IRESNET100, IResNet,
                                  resize_nearest)


def _abstract(model):
  x = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


@pytest.fixture(scope="module")
def state_dict():
  return recipe.regenerate(os.path.join(FIXTURES, "arcface_r50.weights.json"),
                           recipe.seed_of(FIXTURES))


@pytest.fixture(scope="module")
def abstract_r50():
  return _abstract(IResNet())


@pytest.fixture(scope="module")
def arcface(state_dict, abstract_r50):
  """(variables, jitted apply)."""
  return convert_arcface(state_dict, abstract_r50), jax.jit(IResNet().apply)


@pytest.fixture(scope="module")
def fixture():
  return np.load(os.path.join(FIXTURES, "arcface_r50.npz"))


def test_parity_with_official(arcface, fixture):
  variables, apply = arcface
  out = apply(variables, nhwc(fixture["x"]))
  err = rel_err(out, fixture["out"])
  print(f"arcface_r50 out: rel_err {err:.2e}")
  assert err <= 1e-4


def test_input_of_width_112_is_not_resized(arcface, fixture):
  variables, apply = arcface
  x = nhwc(fixture["x"])
  small = resize_nearest(jnp.asarray(x), INPUT_SIZE, INPUT_SIZE)
  assert rel_err(apply(variables, small), apply(variables, x)) <= 1e-6


@pytest.mark.parametrize("in_hw", [(256, 256), (250, 300), (113, 111), (57, 224), (112, 1000)])
def test_resize_matches_torch_nearest(in_hw):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((1, 3) + in_hw).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), (INPUT_SIZE, INPUT_SIZE)).numpy()
  ours = resize_nearest(jnp.asarray(nhwc(x)), INPUT_SIZE, INPUT_SIZE)
  np.testing.assert_array_equal(np.asarray(ours), nhwc(ref))


def _as_iresnet100(state_dict):
  """An iresnet100 state dict: the blocks iresnet50 lacks copy their stage's block 1."""
  out = dict(state_dict)
  for stage, (have, want) in enumerate(zip(IRESNET50, IRESNET100), start=1):
    for block in range(have, want):
      prefix = f"layer{stage}.1."
      out.update({f"layer{stage}.{block}." + k[len(prefix):]: v
                  for k, v in state_dict.items() if k.startswith(prefix)})
  return out


def test_iresnet100_option(state_dict, abstract_r50):
  model = IResNet(layers=IRESNET100)
  abstract = _abstract(model)
  variables = convert_arcface(_as_iresnet100(state_dict), abstract)
  assert "layer3_29" in variables["params"] and "layer3_30" not in variables["params"]
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 256, 256, 3)))
  assert out.shape == (2, 512)
  with pytest.raises(ConversionError, match="missing weights"):
    convert_arcface(state_dict, abstract)
  with pytest.raises(ConversionError, match=r"layer2\.4\."):
    convert_arcface(_as_iresnet100(state_dict), abstract_r50)


@pytest.mark.parametrize("key, edit, message", [
    ("layer3.7.conv2.weight", "drop", "missing weights.*layer3_7/conv2/kernel"),
    ("layer1.0.bn2.running_var", "drop", "missing weights.*batch_stats/layer1_0/bn2/var"),
    ("fc.weight", "misshape", r"fc\.weight"),
    ("layer2.0.downsample.0.weight", "misshape", r"layer2\.0\.downsample\.0\.weight"),
    ("features.running_mean", "misshape", r"features\.running_mean"),
    ("head.weight", "add", r"unexpected key.*head\.weight"),
])
def test_converter_errors(state_dict, abstract_r50, key, edit, message):
  broken = dict(state_dict)
  if edit == "drop":
    del broken[key]
  elif edit == "misshape":
    broken[key] = broken[key][..., :-1]
  else:
    broken[key] = np.zeros((3,), np.float32)
  with pytest.raises(ConversionError, match=message):
    convert_arcface(broken, abstract_r50)
