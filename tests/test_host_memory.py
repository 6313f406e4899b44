"""`tools.host_memory`: with glibc's huge pages (the tunable set by whoever starts the
process), or with freed memory reused, repeated runs of a compiled program fault far
fewer pages in (counted by the kernel); `g2face bench` reuses freed memory on request."""
import json
import os
import platform
import subprocess
import sys

import pytest

from g2face_jax.tools import host_memory

# A fresh process runs one jitted program whose output and temporaries are ~64 MB
# each, 20 times after 10 warm-up runs, and prints the page faults of each run.
FAULTS_RUN = """
import json, resource, sys
from g2face_jax.tools import host_memory
applied = host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
x = jnp.ones((64, 512, 512), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x * 2.0) + jnp.sin(x)[::-1])
for _ in range(10):
  jax.block_until_ready(f(x))
faults = []
for _ in range(20):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sorted(faults)}))
"""

ONE_BUFFER_PAGES = 64 * 512 * 512 * 4 // 4096


def _without_tunables() -> dict:
  return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",)}


def _faults(mode: str, env=None) -> dict:
  """FAULTS_RUN's record; `env` default: this environment without glibc tunables."""
  env = dict(_without_tunables() if env is None else env, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", FAULTS_RUN, mode], capture_output=True, text=True,
                        env=env, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def system_faults() -> dict:
  """FAULTS_RUN under glibc's defaults: every run faults its 64 MB buffer in afresh."""
  system = _faults("system")
  assert not system["applied"] and min(system["faults"]) >= ONE_BUFFER_PAGES
  return system


huge_pages = pytest.mark.skipif(not host_memory.huge_pages_supported(),
                                reason="needs glibc >= 2.35 and transparent huge pages")


@huge_pages
def test_huge_pages_fault_buffers_in_2_mib_at_a_time(system_faults):
  huge = _faults("system", dict(_without_tunables(), GLIBC_TUNABLES=host_memory.HUGE_PAGES_TUNABLE))
  # a 2 MiB page holds 512 small ones: the 64 MB buffer takes 32 huge-page faults,
  # plus up to 511 small ones where the mapping starts off a 2 MiB boundary
  assert max(huge["faults"]) < ONE_BUFFER_PAGES / 20


def test_huge_pages_requested_reads_the_tunable_among_others():
  env = {"GLIBC_TUNABLES": "glibc.malloc.check=0:" + host_memory.HUGE_PAGES_TUNABLE}
  assert host_memory.huge_pages_requested(env) and not host_memory.huge_pages_requested({})


def test_transparent_huge_pages_mode_reads_the_kernel_setting(tmp_path):
  setting = tmp_path / "enabled"
  setting.write_text("always [madvise] never\n")
  assert host_memory.transparent_huge_pages_mode(str(setting)) == "madvise"
  assert host_memory.transparent_huge_pages_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again(system_faults):
  reused = _faults("reuse")
  assert reused["applied"]
  # reused: the heap settles; now and then it still grows by a buffer (a different
  # order of frees), so most runs, not all, fault nothing
  assert reused["faults"][len(reused["faults"]) // 2] == 0


def test_bench_applies_it_when_asked():
  run = ("import sys; from g2face_jax import cli; from g2face_jax.tools import host_memory; "
         "cli.main(sys.argv[1:]); print(host_memory.applied())")
  for args, expected in ((["bench", "--batch", "x"], "False"),
                         (["bench", "--batch", "x", "--reuse-freed-memory"], "True")):
    done = subprocess.run([sys.executable, "-c", run] + args, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.stdout.strip().splitlines()[-1] == expected, done.stderr
