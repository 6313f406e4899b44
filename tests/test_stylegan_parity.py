"""Decoder (`anonymous_net`) and discriminator against the official outputs, and their converters."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, nhwc, rel_err
from g2face_jax import config as config_lib
from g2face_jax import models
from g2face_jax.tools import parity
from g2face_jax.convert import recipe
from g2face_jax.convert import stylegan as convert_stylegan
from g2face_jax.convert.table import ConversionError
from g2face_jax.nn import decoder as decoder_lib

TOL = 1e-4


def _recipe(name):
  return recipe.regenerate(os.path.join(FIXTURES, f"{name}.weights.json"), recipe.seed_of(FIXTURES))


@pytest.fixture(scope="module")
def generator_fixture():
  return np.load(os.path.join(FIXTURES, "generator.npz"))


@pytest.fixture(scope="module")
def official_decoder():
  return parity.official_decoder(FIXTURES)


def test_generator_matches_official(generator_fixture, official_decoder):
  err = parity.check_generator(FIXTURES)["out"]
  print(f"generator out rel err {err:.2e}")
  assert err <= TOL


def test_discriminator_matches_official():
  err = parity.check_discriminator(FIXTURES)["out"]
  print(f"discriminator out rel err {err:.2e}")
  assert err <= TOL


def test_paper_decoder_has_the_official_parameter_count_per_tensor(official_decoder):
  _, variables = official_decoder
  ours = sorted(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
  with open(os.path.join(FIXTURES, "generator.weights.json")) as f:
    entries = json.load(f)
  official = sorted(int(np.prod(e["shape"])) for e in entries if not e["key"].endswith("kernel"))
  assert ours == official
  assert sum(ours) == sum(official)


def test_decoder_noise_from_rng_is_reproducible_and_batch_independent():
  cfg = config_lib.load("tiny").model
  model = models.build_decoder(cfg)
  b = 3
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (b, cfg.size, cfg.size, 3)), jnp.float32)
  styles = jnp.asarray(rng.standard_normal((b, decoder_lib.num_styles(cfg.size), cfg.style_dim)), jnp.float32)
  bits = jnp.asarray(rng.integers(0, 2, (b, 512, 32)), jnp.float32)
  variables = jax.jit(model.init)({"params": jax.random.key(0), "noise": jax.random.key(1)},
                                  x, styles, bits)
  # Noise strengths start at zero; give them weight so the noise shows.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.5 if "noise" in jax.tree_util.keystr(path) else v, variables)
  drawn = jax.jit(lambda v, key: model.apply(v, x, styles, bits, rngs={"noise": key}))
  a = drawn(variables, jax.random.key(5))
  again = drawn(variables, jax.random.key(5))
  other = drawn(variables, jax.random.key(6))
  assert a.shape == (b, cfg.size, cfg.size, 3)
  np.testing.assert_array_equal(a, again)
  assert not np.allclose(a, other)
  noise = [jnp.asarray(rng.standard_normal(s), jnp.float32)
           for s in decoder_lib.noise_shapes(cfg.size, b)]
  given = jax.jit(model.apply)
  full = given(variables, x, styles, bits, noise)
  one = given(variables, x[1:2], styles[1:2], bits[1:2], [n[1:2] for n in noise])
  np.testing.assert_allclose(one, full[1:2], rtol=1e-5, atol=1e-5)


def test_decoder_rejects_bad_shapes():
  cfg = config_lib.load("tiny").model
  model = models.build_decoder(cfg)
  x = jnp.zeros((1, cfg.size, cfg.size, 3))
  styles = jnp.zeros((1, decoder_lib.num_styles(cfg.size), cfg.style_dim))
  with pytest.raises(ValueError, match="bits must be"):
    model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x, styles, jnp.zeros((1, 16384)))
  with pytest.raises(ValueError, match="decoder input"):
    model.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x[:, :16], styles,
               jnp.zeros((1, 512, 32)))


@pytest.fixture(scope="module")
def decoder_abstract(generator_fixture):
  model = models.build_decoder(config_lib.load("paper").model)
  fx = generator_fixture
  return convert_stylegan.abstract(model, nhwc(fx["x"][:1]), fx["styles"][:1], fx["bits"][:1],
                                   [n[:1] for n in parity.generator_noise(fx)])


def test_decoder_converter_names_missing_misshapen_and_unexpected_keys(decoder_abstract):
  sd = _recipe("generator")
  missing = {k: v for k, v in sd.items() if k != "convs.3.noise.weight"}
  with pytest.raises(ConversionError, match=r"missing weights for.*convs\.3/noise/weight"):
    convert_stylegan.convert_decoder(missing, decoder_abstract)
  misshapen = dict(sd, **{"fusion_mask.2.conv.weight": np.zeros((512, 1024, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match="fusion_mask.2.conv.weight.*shape"):
    convert_stylegan.convert_decoder(misshapen, decoder_abstract)
  unexpected = dict(sd, **{"extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match="unexpected key.*extra.weight"):
    convert_stylegan.convert_decoder(unexpected, decoder_abstract)
  wrong_kernel = dict(sd, **{"convs.0.conv.blur.kernel": np.ones((4, 4), np.float32)})
  with pytest.raises(ConversionError, match="convs.0.conv.blur.kernel"):
    convert_stylegan.convert_decoder(wrong_kernel, decoder_abstract)


def test_discriminator_checkpoint_is_not_a_decoder(decoder_abstract):
  with pytest.raises(ConversionError):
    convert_stylegan.convert_decoder(_recipe("discriminator"), decoder_abstract)


def _as_rosinality_g_ema(generator_sd):
  """A rosinality `g_ema` built from the recipe's synthesis tensors plus its unused parts."""
  shared = ("input.", "conv1.", "to_rgb1.", "convs.", "to_rgbs.")
  g = {k: v for k, v in generator_sd.items() if k.startswith(shared)}
  g["style.1.weight"] = np.ones((512, 512), np.float32)
  g["style.1.bias"] = np.zeros(512, np.float32)
  g["noises.noise_0"] = np.zeros((1, 1, 4, 4), np.float32)
  return g


def test_stylegan2_g_ema_loads_into_the_synthesis_layers_only(decoder_abstract):
  sd = _recipe("generator")
  full = convert_stylegan.convert_decoder(sd, decoder_abstract)["params"]
  start = jax.tree.map(lambda a: np.full(a.shape, 7.0, np.float32), decoder_abstract)
  loaded = convert_stylegan.stylegan2_into_decoder(_as_rosinality_g_ema(sd), start)["params"]
  start = start["params"]
  for name in loaded:
    synthesis = name == "input" or name.startswith(("conv1", "to_rgb1", "convs_", "to_rgbs_"))
    for a, b, s in zip(jax.tree.leaves(loaded[name]), jax.tree.leaves(full[name]),
                       jax.tree.leaves(start[name])):
      np.testing.assert_array_equal(a, b if synthesis else s)


def test_stylegan2_d_loads_into_the_discriminator():
  model = models.build_discriminator(config_lib.load("paper").model)
  abstract = convert_stylegan.abstract(model, jnp.zeros((1, 256, 256, 3)))
  variables = convert_stylegan.convert_discriminator(_recipe("discriminator"), abstract,
                                                     what="StyleGAN2 d")
  assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, abstract)
  with pytest.raises(ConversionError, match="StyleGAN2 d: unexpected key"):
    convert_stylegan.convert_discriminator(dict(_recipe("discriminator"), foo=np.zeros(1)),
                                           abstract, what="StyleGAN2 d")
