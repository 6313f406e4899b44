"""Two processes on localhost joined by jax.distributed train the tiny config together:
each feeds its half of every global batch, both end with the same losses and parameters,
and those equal a single process driving the same two-device mesh."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
OVERRIDES = "train.global_batch=4,train.replica_batch=2,mesh.data=2,mesh.fsdp=1"
STEPS = 2


def _env(tmp_path, devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"))


def _worker(out, *distributed):
  return [sys.executable, os.path.join(HERE, "train_worker.py"), str(out), str(STEPS), OVERRIDES,
          *map(str, distributed)]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_match_one_process(tmp_path):
  coordinator = f"localhost:{_free_port()}"
  procs = [subprocess.Popen(_worker(tmp_path / f"p{i}.npz", coordinator, 2, i),
                            env=_env(tmp_path, 1), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=1500)
    assert p.returncode == 0, out
  subprocess.run(_worker(tmp_path / "one.npz"), env=_env(tmp_path, 2), check=True, timeout=1500)

  p0, p1, one = (np.load(tmp_path / f"{n}.npz") for n in ("p0", "p1", "one"))
  assert len([k for k in one.files if k.startswith("final")]) > 50
  for k in one.files:
    # same mesh, same per-device shards, same reduction order: the very same numbers
    np.testing.assert_array_equal(p0[k], one[k], err_msg=k)
    np.testing.assert_array_equal(p1[k], one[k], err_msg=k)
