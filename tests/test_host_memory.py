"""`host_memory.reuse_freed_memory`: repeated runs of a compiled program stop
faulting their buffers in (counted by the kernel); `g2face bench` applies it on request."""
import json
import os
import platform
import subprocess
import sys

import pytest

# A fresh process runs one jitted program whose output and temporaries are ~64 MB
# each, 20 times after 10 warm-up runs, and prints the page faults per run.
FAULTS_RUN = """
import json, resource, sys
from g2face_jax import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
x = jnp.ones((64, 512, 512), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x * 2.0) + jnp.sin(x)[::-1])
for _ in range(10):
  jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  jax.block_until_ready(f(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"applied": applied, "faults_per_run": faults}))
"""

ONE_BUFFER_PAGES = 64 * 512 * 512 * 4 // 4096


def _faults(mode: str) -> dict:
  done = subprocess.run([sys.executable, "-c", FAULTS_RUN, mode], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
  system = _faults("system")
  reused = _faults("reuse")
  assert not system["applied"] and reused["applied"]
  # glibc's defaults: every run maps its 64 MB output afresh and faults each page in
  assert system["faults_per_run"] >= ONE_BUFFER_PAGES
  # reused: the heap settles; now and then it still grows by a buffer (a different
  # order of frees), so most runs, not all, fault nothing
  assert reused["faults_per_run"] < ONE_BUFFER_PAGES / 4


def test_bench_applies_it_when_asked():
  run = ("import sys; from g2face_jax import cli, host_memory; "
         "cli.main(sys.argv[1:]); print(host_memory.applied())")
  for args, expected in ((["bench", "--batch", "x"], "False"),
                         (["bench", "--batch", "x", "--reuse-freed-memory"], "True")):
    done = subprocess.run([sys.executable, "-c", run] + args, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.stdout.strip().splitlines()[-1] == expected, done.stderr
