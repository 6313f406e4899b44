"""The training loop keeps the host off the step path: no implicit host<->device transfer in
the steady-state iterations, metrics fetched only at the logging interval and before a
checkpoint, a NaN still stops the run naming its step, and `log.profile_steps` writes a
profiler trace.

One tiny-config run (module scope, 5 iterations) serves every test: logging every 3
iterations, checkpoints every 5, a profiler trace of 1 iteration, the transfer guard
'disallow', and the metrics of iteration 5 made NaN on the devices. It runs in a fresh
process started on the platforms `g2face` picks (`platforms`): with the `tpu` extra on a
host without TPU chips, the TPU plugin JAX would otherwise start registers a profiler that
crashes this version of jaxlib.
"""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

NAN_STEP = 5
OVERRIDES = ("train.num_steps=6,log.every_steps=3,checkpoint.every_steps=5,"
             "checkpoint.async_save=false,log.sample_every_steps=0,log.samples=2,"
             "log.profile_steps=1,log.transfer_guard=disallow")


def _worker(workdir: str, result: str) -> None:
  """Trains until the NaN; writes the order of train steps and `jax.device_get` calls, the
  log lines and the error to `result` (JSON)."""
  from g2face_jax import platforms
  platforms.use_cpu_when_nothing_else_runs()
  import jax
  import jax.numpy as jnp
  from g2face_jax import config as config_lib
  from g2face_jax.train import loop, runtime

  events, lines = [], []
  poison = jax.jit(lambda m: jax.tree.map(lambda v: v * jnp.nan, m))
  create, device_get = runtime.create, jax.device_get

  def create_counting(*args, **kwargs):
    rt = create(*args, **kwargs)

    def train_step(state, frozen, images):
      state, metrics = rt.train_step(state, frozen, images)
      events.append("step")
      if events.count("step") == NAN_STEP:
        metrics = poison(metrics)  # on the devices: no transfer
      return state, metrics

    return dataclasses.replace(rt, train_step=train_step)

  def device_get_counting(x):
    events.append("get")
    return device_get(x)

  runtime.create, jax.device_get = create_counting, device_get_counting
  error = None
  try:
    loop.train(config_lib.load("tiny," + OVERRIDES), workdir, log=lines.append)
  except FloatingPointError as e:
    error = str(e)
  with open(result, "w", encoding="utf-8") as f:
    json.dump(dict(events=events, lines=lines, error=error), f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("loop")
  workdir, result = str(root / "run"), str(root / "result.json")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), workdir, result],
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(result, encoding="utf-8") as f:
    return dict(json.load(f), workdir=workdir)


def _fetches_after_each_step(events):
  """{iteration: `jax.device_get` calls between it and the next one} (0: before the first)."""
  out, step = {0: 0}, 0
  for e in events:
    if e == "step":
      step += 1
      out[step] = 0
    else:
      out[step] += 1
  return out


def test_transfer_guard_refuses_implicit_transfers_on_this_backend():
  """The guard the loop's steps run under is live here: an implicit host-to-device
  transfer fails, an explicit one passes."""
  import jax
  add_one = jax.jit(lambda x: x + 1)
  with jax.transfer_guard("disallow"):
    with pytest.raises(Exception, match="[Dd]isallowed host-to-device"):
      add_one(np.ones(3, np.float32))
    explicit = jax.device_get(add_one(jax.device_put(np.ones(3, np.float32))))
  np.testing.assert_array_equal(explicit, 2)


def test_steady_steps_ran_under_the_guard_and_fetch_metrics_only_at_intervals(run):
  assert run["events"].count("step") == NAN_STEP  # steps 2-5 ran under transfer_guard disallow
  fetches = _fetches_after_each_step(run["events"])
  del fetches[0]  # the sample grid before training
  # 1: the compiled first step (checked: orbax saves the first step of a new workdir);
  # 3: the logging interval; 5: before the checkpoint (where the NaN is found)
  assert fetches == {1: 1, 2: 0, 3: 1, 4: 0, 5: 1}, fetches
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [3]
  assert records[0]["steps_per_s"] > 0 and np.isfinite(records[0]["anon/total"])
  assert any(line.startswith("step 3: ") and "steps_per_s" in line for line in run["lines"])


def test_nan_stops_the_run_naming_the_step_before_the_checkpoint(run):
  message = run["error"]
  assert message is not None and "\n" not in message
  assert f"at step {NAN_STEP}" in message and "steps 4-5" in message and "anon/total" in message
  checkpoints = os.path.join(run["workdir"], "checkpoints")
  assert sorted(os.listdir(checkpoints)) == ["1"]  # the NaN step was not saved


def test_profile_steps_writes_a_trace(run):
  profile = os.path.join(run["workdir"], "profile")
  traces = glob.glob(os.path.join(profile, "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert any(f"profile of steps 2-2 written under {profile}" in line for line in run["lines"])


if __name__ == "__main__":
  _worker(*sys.argv[1:])
