"""Deep3DFaceRecon regressor parity with the official network, coefficient helpers,
converter checks."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, nhwc, rel_err

from g2face_jax.convert import recipe
from g2face_jax.convert.face3d import convert_recon_net
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn.face3d import NUM_COEFFS, ReconNet, geometry_input, split_coefficients


@pytest.fixture(scope="module")
def state_dict():
  return recipe.regenerate(os.path.join(FIXTURES, "d3dfr_r50.weights.json"),
                           recipe.seed_of(FIXTURES))


@pytest.fixture(scope="module")
def abstract():
  return jax.eval_shape(lambda: ReconNet().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))


@pytest.fixture(scope="module")
def fixture():
  return np.load(os.path.join(FIXTURES, "d3dfr_r50.npz"))


def test_parity_with_official(state_dict, abstract, fixture):
  variables = convert_recon_net(state_dict, abstract)
  out = jax.jit(ReconNet().apply)(variables, nhwc(fixture["x"]))
  err = rel_err(out, fixture["out"])
  print(f"d3dfr_r50 out: rel_err {err:.2e}")
  assert out.shape == (fixture["x"].shape[0], NUM_COEFFS)
  assert err <= 1e-4


def test_checkpoint_dict_with_net_recon(state_dict, abstract):
  nested = convert_recon_net({"net_recon": state_dict}, abstract)
  flat = convert_recon_net(state_dict, abstract)
  jax.tree.map(np.testing.assert_array_equal, nested, flat)


def test_coefficient_helpers(fixture):
  coeff = fixture["out"]
  parts = split_coefficients(jnp.asarray(coeff))
  sizes = {"id": 80, "exp": 64, "tex": 80, "angles": 3, "gamma": 27, "translation": 3}
  assert {k: v.shape[1] for k, v in parts.items()} == sizes
  np.testing.assert_array_equal(np.concatenate([parts[k] for k in sizes], axis=1), coeff)
  np.testing.assert_array_equal(parts["angles"], coeff[:, 224:227])
  geometry = geometry_input(jnp.asarray(coeff))
  np.testing.assert_array_equal(geometry, np.concatenate([coeff[:, :144], coeff[:, 224:227]], 1))


@pytest.mark.parametrize("key, edit, message", [
    ("backbone.layer3.5.conv3.weight", "drop", "missing weights.*backbone/layer3_5/conv3/kernel"),
    ("final_layers.6.bias", "drop", "missing weights.*final_layers_6/bias"),
    ("final_layers.4.weight", "misshape", r"final_layers\.4\.weight"),
    ("backbone.layer4.0.downsample.1.running_var", "misshape",
     r"backbone\.layer4\.0\.downsample\.1\.running_var"),
    ("backbone.fc.weight", "add", r"unexpected key.*backbone\.fc\.weight"),
])
def test_converter_errors(state_dict, abstract, key, edit, message):
  broken = dict(state_dict)
  if edit == "drop":
    del broken[key]
  elif edit == "misshape":
    broken[key] = broken[key][..., :-1]
  else:
    broken[key] = np.zeros((257, 2048), np.float32)
  with pytest.raises(ConversionError, match=message):
    convert_recon_net(broken, abstract)
