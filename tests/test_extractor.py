"""Password extractor against the official parity fixture, plus the small-image config."""
import os

import jax
import numpy as np
import pytest

from conftest import FIXTURES, nhwc, rel_err
from g2face_jax.convert import recipe
from g2face_jax.convert.mapping import convert_hiding_extractor
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn.extractor import PasswordExtractor, output_channels

TOL = 1e-4


@pytest.fixture(scope="module")
def case():
  data = dict(np.load(os.path.join(FIXTURES, "hiding_extractor.npz")))
  state = recipe.regenerate(os.path.join(FIXTURES, "hiding_extractor.weights.json"),
                            recipe.seed_of(FIXTURES))
  x = nhwc(data["x"])
  model = PasswordExtractor(image_size=x.shape[1])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  return data, state, x, model, abstract


def _first_block_bn_inputs(state, x):
  """Inputs of body.0's two 1x1-conv BatchNorms, in float64 NumPy (1x1 convs are matmuls)."""
  def conv1x1(h, name):
    w = state[f"{name}.weight"][:, :, 0, 0].T.astype(np.float64)
    return h @ w + state[f"{name}.bias"]
  h = conv1x1(x.reshape(-1, 3).astype(np.float64), "conv1x1_input")
  h = np.where(h >= 0, h, 0.1 * h)
  return {"bn_branch_1_1": conv1x1(h, "body.0.conv1x1_branch_1"),
          "bn_branch_2_1": conv1x1(h, "body.0.conv1x1_branch_2")}


def test_parity_eval_train_and_running_stats(case):
  data, state, x, model, abstract = case
  variables = convert_hiding_extractor(state, abstract)
  out_eval = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
  out_train, updates = jax.jit(
      lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"]))(variables, x)
  errs = {"out_eval": rel_err(out_eval, data["out_eval"]),
          "out_train": rel_err(out_train, data["out_train"])}

  for bn, h in _first_block_bn_inputs(state, x).items():
    prefix = f"body.0.{bn}"
    stats = updates["batch_stats"]["body_0"][bn]
    errs[f"{bn} running_mean"] = rel_err(
        stats["mean"], 0.9 * state[f"{prefix}.running_mean"] + 0.1 * h.mean(0))
    errs[f"{bn} running_var"] = rel_err(
        stats["var"], 0.9 * state[f"{prefix}.running_var"] + 0.1 * h.var(0, ddof=1))
  for name, err in errs.items():
    print(f"hiding_extractor {name} rel_err {err:.2e}")
  assert all(err <= TOL for err in errs.values()), errs


def test_converter_errors(case):
  _, state, _, _, abstract = case
  key = "body.1.conv3x3_branch_1.weight"

  missing = {k: v for k, v in state.items() if k != key}
  with pytest.raises(ConversionError, match=r"missing weights for .*body_1/conv3x3_branch_1/kernel"):
    convert_hiding_extractor(missing, abstract)

  misshapen = dict(state, **{key: state[key][:, :, :1]})
  with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
    convert_hiding_extractor(misshapen, abstract)

  for extra in ("extra.weight", "body.0.bn_extra.weight"):  # no rule / a rule with no target
    unexpected = dict(state, **{extra: np.zeros(64, np.float32)})
    with pytest.raises(ConversionError, match=extra.replace(".", r"\.")):
      convert_hiding_extractor(unexpected, abstract)

  tiny = PasswordExtractor(image_size=32)
  tiny_abstract = jax.eval_shape(lambda: tiny.init(jax.random.key(0), np.zeros((1, 32, 32, 3))))
  with pytest.raises(ConversionError, match=r"conv1x1_output\.weight"):
    convert_hiding_extractor(state, tiny_abstract)


def test_tiny_config_logits_follow_nchw_flatten():
  size = 32
  channels = output_channels(size)
  assert channels * (size // 2) ** 2 == 512 * 32
  model = PasswordExtractor(image_size=size)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = model.init(jax.random.key(0), x)
  logits, inter = model.apply(variables, x, capture_intermediates=True)
  assert logits.shape == (2, 512, 32)
  final_map = np.asarray(inter["intermediates"]["conv1x1_output"]["__call__"][0])
  assert final_map.shape == (2, size // 2, size // 2, channels)
  np.testing.assert_array_equal(
      np.asarray(logits).reshape(2, -1), final_map.transpose(0, 3, 1, 2).reshape(2, -1))


@pytest.mark.parametrize("size", [48, 512])
def test_unsupported_sizes_are_rejected(size):
  with pytest.raises(ValueError, match="image size"):
    output_channels(size)
