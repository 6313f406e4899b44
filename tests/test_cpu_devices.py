"""The CPU split into single-threaded devices (`cpu_devices.split`), and the
pipeline's batches shared over devices."""
import json
import os
import subprocess
import sys

import jax
import pytest

from g2face_jax import models, pipeline
from g2face_jax.tools import cpu_devices

TESTS = os.path.dirname(os.path.abspath(__file__))

# Run in a fresh process (the device count is fixed when JAX starts): the tiny
# pipeline at batch 4 split over 2 CPU devices, against the same process's
# one-program run (a mesh set by the caller turns the split off).
SPLIT_RUN = """
import json, sys
import numpy as np
from g2face_jax.tools import cpu_devices
cpu_devices.split(2)
import jax
sys.path.insert(0, sys.argv[1])
from conftest import random_variables
from g2face_jax import config, models, pipeline
from g2face_jax.nn import decoder
jax.config.update("jax_default_matmul_precision", "highest")
cfg = config.load("tiny")
cfg.model.arcface_layers = (1, 1, 1, 1)
nets = models.Networks.from_config(cfg.model)
variables = random_variables(cfg.model, models.INFERENCE_NETWORKS)
rng = np.random.default_rng(1)
s = cfg.model.size
x = rng.uniform(-1, 1, (4, s, s, 3)).astype(np.float32)
z = rng.standard_normal((4, cfg.model.identity_dim)).astype(np.float32)
noise = [rng.standard_normal(n).astype(np.float32) for n in decoder.noise_shapes(s, 4)]

def run():
  out = dict(pipeline.official_anonymize(nets, variables, x, z, noise))
  out.update(pipeline.official_recover(nets, variables, out["anon"], out["hide_bits"], noise))
  return out

split = run()
with jax.set_mesh(jax.sharding.Mesh(jax.devices()[:1], ("one",))):
  whole = run()
print(json.dumps(dict(
    devices=jax.device_count(), shares=pipeline.data_parallel_devices(4),
    odd_batch_shares=pipeline.data_parallel_devices(3),
    split_devices=len(split["anon"].sharding.device_set),
    whole_devices=len(whole["anon"].sharding.device_set),
    max_abs_diff={k: float(np.max(np.abs(np.asarray(split[k], np.float64) - whole[k])))
                  for k in ("arc_id", "coeff", "anon", "logits", "coeff_anon", "recovered")})))
"""


def test_batch_split_over_devices_gives_the_one_program_result():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", SPLIT_RUN, TESTS], env=env, capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(done.stdout.strip().splitlines()[-1])
  assert (r["devices"], r["shares"], r["odd_batch_shares"]) == (2, 2, 1)
  assert (r["split_devices"], r["whole_devices"]) == (2, 1)
  assert max(r["max_abs_diff"].values()) <= 1e-5, r["max_abs_diff"]


def test_split_is_refused_once_jax_has_started_and_checks_the_count():
  jax.devices()  # the backend has started in this process
  flags = os.environ.get("XLA_FLAGS")
  with pytest.raises(ValueError, match="before JAX starts"):
    cpu_devices.split(2)
  assert os.environ.get("XLA_FLAGS") == flags
  with pytest.raises(ValueError, match=">= 1"):
    cpu_devices.split(0)
  cpu_devices.split(1)  # one device: nothing to change
  assert pipeline.data_parallel_devices(4) == 1


def test_bench_refuses_cpu_devices_with_device_counts(capsys):
  from g2face_jax import cli
  assert cli.main(["bench", "--train", "--devices", "1,2", "--cpu-devices", "2"]) == 2
  assert "give one of them" in capsys.readouterr().err
