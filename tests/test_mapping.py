"""Style mapper and dummy-identity net against the official parity fixtures."""
import os

import jax
import numpy as np
import pytest

from conftest import FIXTURES, rel_err
from g2face_jax.convert import recipe
from g2face_jax.convert.mapping import convert_map_2_id, convert_style_mlp
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn.mapping import Map2ID, StyleMapper

TOL = 1e-4


def _load(name):
  data = dict(np.load(os.path.join(FIXTURES, f"{name}.npz")))
  state = recipe.regenerate(os.path.join(FIXTURES, f"{name}.weights.json"), recipe.seed_of(FIXTURES))
  return data, state


def _abstract(model, *args):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))


@pytest.fixture(scope="module")
def style_case():
  data, state = _load("style_mlp")
  model = StyleMapper()
  abstract = _abstract(model, data["latent_id"], data["latent_shape"])
  return data, state, model, abstract


@pytest.fixture(scope="module")
def map_case():
  data, state = _load("map_2_id")
  model = Map2ID()
  abstract = _abstract(model, data["z"])
  return data, state, model, abstract


def test_style_mlp_parity(style_case):
  data, state, model, abstract = style_case
  variables = convert_style_mlp(state, abstract)
  out = jax.jit(model.apply)(variables, data["latent_id"], data["latent_shape"])
  err = rel_err(out, data["out"])
  print(f"style_mlp out rel_err {err:.2e}")
  assert err <= TOL


def test_style_mapper_tiny_config_shape():
  model = StyleMapper(style_dim=16, n_mlp=2, repeats=(3, 3, 2))
  ident, geom = np.ones((3, 512), np.float32), np.ones((3, 147), np.float32)
  variables = model.init(jax.random.key(0), ident, geom)
  assert model.apply(variables, ident, geom).shape == (3, 8, 16)
  assert sorted(variables["params"]) == sorted(
      f"{h}_{i}" for h in ("style_low", "style_middle", "style_high") for i in range(2))


def _map_2_id_numpy_hidden(state, z):
  """Map2ID's BatchNorm input, computed in float64 NumPy from the official weights."""
  def lrelu(h):
    return np.where(h >= 0, h, 0.2 * h)
  h = lrelu(z @ state["map_2_id.0.weight"].T.astype(np.float64) + state["map_2_id.0.bias"])
  return lrelu(h @ state["map_2_id.2.weight"].T.astype(np.float64) + state["map_2_id.2.bias"])


def test_map_2_id_parity_and_running_stats(map_case):
  data, state, model, abstract = map_case
  variables = convert_map_2_id(state, abstract)
  z = data["z"]
  out_eval = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, z)
  out_train, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, z)
  errs = {"out_eval": rel_err(out_eval, data["out_eval"]),
          "out_train": rel_err(out_train, data["out_train"])}

  hidden = _map_2_id_numpy_hidden(state, z.astype(np.float64))
  expect_mean = 0.9 * state["map_2_id.4.running_mean"] + 0.1 * hidden.mean(0)
  expect_var = 0.9 * state["map_2_id.4.running_var"] + 0.1 * hidden.var(0, ddof=1)
  errs["running_mean"] = rel_err(updates["batch_stats"]["bn"]["mean"], expect_mean)
  errs["running_var"] = rel_err(updates["batch_stats"]["bn"]["var"], expect_var)
  for name, err in errs.items():
    print(f"map_2_id {name} rel_err {err:.2e}")
  assert all(err <= TOL for err in errs.values()), errs


@pytest.mark.parametrize("case, convert", [("style_case", convert_style_mlp),
                                           ("map_case", convert_map_2_id)])
def test_converter_errors(request, case, convert):
  _, state, _, abstract = request.getfixturevalue(case)
  key = next(k for k, v in state.items() if np.ndim(v) == 2)

  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ConversionError, match="missing weights"):
    convert(missing, abstract)

  misshapen = dict(state, **{key: state[key][:, :-1]})
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    convert(misshapen, abstract)

  unexpected = dict(state, **{"extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match=r"extra\.weight"):
    convert(unexpected, abstract)


def test_style_mlp_converter_rejects_other_depth(style_case):
  _, state, _, _ = style_case
  data = np.zeros((2, 512), np.float32), np.zeros((2, 147), np.float32)
  shallow = _abstract(StyleMapper(n_mlp=2), *data)
  with pytest.raises(ConversionError, match=r"style_low\.2\.weight"):
    convert_style_mlp(state, shallow)
