"""The training job: data, the sharded step, checkpoints, metrics and sample grids.

`train(config, workdir)` runs `config.train.num_steps` iterations (resuming
from the newest readable checkpoint in workdir/checkpoints, else starting from
the bundle of `pretrained.bundle` as `pretrained` describes), saves on SIGTERM
and at the end, and returns a summary (compile time, steps/s, sample bit error
rate and recovery L1 before and after).

The host never waits for a step to finish except where it needs its results:
step t is dispatched, the batch of step t + 1 is read and placed on the
devices while step t runs, and the host stays at most one step ahead. The
metrics stay on the devices until the logging interval (`log.every_steps`), a
checkpoint or the end, where they are fetched in one transfer, checked for
non-finite values and averaged.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np

from g2face_jax.datasets import pipeline, sources, transforms
from g2face_jax.train import checkpoint as checkpoint_lib
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import metrics as metrics_lib
from g2face_jax.train import pretrained as pretrained_lib
from g2face_jax.train import runtime

CONSOLE_KEYS = ("anon/total", "rec/total", "disc/total", "anon/bit_error_rate", "rec/l1", "lr",
                "steps_per_s", "images_per_s")
TRANSFER_GUARDS = ("allow", "log", "disallow")


class _Stop:
  """Set by SIGTERM: the loop saves a checkpoint and returns after the current step."""

  def __init__(self):
    self.requested = False
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    else:
      self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _PendingMetrics:
  """Metrics of the steps since the last fetch, kept on the devices."""

  def __init__(self):
    self._steps: list[int] = []
    self._metrics: list[dict] = []

  def add(self, step: int, metrics: dict) -> None:
    self._steps.append(step)
    self._metrics.append(metrics)

  def fetch(self) -> list[tuple[int, dict]]:
    """(step, host scalars) of every pending step, in one transfer; raises
    FloatingPointError naming the steps if any value is not finite."""
    if not self._steps:
      return []
    steps, values = self._steps, jax.device_get(self._metrics)
    self._steps, self._metrics = [], []
    for step, scalars in zip(steps, values):
      bad = sorted(k for k, v in scalars.items() if not np.all(np.isfinite(v)))
      if bad:
        raise FloatingPointError(
            f"non-finite {', '.join(bad)} at step {step} (metrics of steps {steps[0]}-{steps[-1]} "
            "checked); stopping without saving them")
    return list(zip(steps, values))


class _Profile:
  """A `jax.profiler` trace of `steps` iterations, started after the first (compiled) one."""

  def __init__(self, directory: str, steps: int, log):
    self.directory, self.steps, self.log = directory, steps, log
    self.first = None  # first traced step while tracing

  def start(self, next_step: int, last_step: int) -> None:
    if self.steps > 0 and next_step <= last_step:
      jax.profiler.start_trace(self.directory)
      self.first = next_step

  def after(self, step: int, outputs) -> None:
    """Stop once `step`, the last of the traced ones, has run."""
    if self.first is not None and step >= self.first + self.steps - 1:
      jax.block_until_ready(outputs)
      self.stop(step)

  def stop(self, step: int) -> None:
    if self.first is None:
      return
    jax.profiler.stop_trace()
    self.log(f"profile of steps {self.first}-{step} written under {self.directory} "
             "(TensorBoard's profile tab or XProf)")
    self.first = None


def _sample_images(rt: runtime.Runtime, source, count: int) -> jax.Array:
  """The first images of the source (no flip), as a global batch of a multiple of the devices."""
  n = max(1, math.ceil(count / rt.mesh.size)) * rt.mesh.size
  decode_resize = transforms.DecodeResize(rt.config.model.size)
  pixels = np.stack([decode_resize.map(source[i % len(source)]) for i in range(n)])
  batch = transforms.ToUnitRange().map(pixels)
  return jax.make_array_from_callback(batch.shape, rt.batch_sharding, lambda idx: batch[idx])


def _due(step: int, every: int) -> bool:
  return bool(every) and step % every == 0


def train(config: ml_collections.ConfigDict, workdir: str, log=print,
          started: Callable[[], None] | None = None) -> dict:
  """Run (or resume) training in workdir; returns a summary dict of measured figures.

  `started` (optional) is called once the newest checkpoint, if any, has restored, before
  the run writes anything else into workdir: a refused resume (a checkpoint of another
  config, an I/O error) leaves workdir as it was."""
  for line in pretrained_lib.preflight(config):  # refuses a run missing what it needs
    log(line)
  if config.log.transfer_guard not in TRANSFER_GUARDS:
    raise ValueError(f"log.transfer_guard is '{config.log.transfer_guard}'; expected one of "
                     f"{', '.join(TRANSFER_GUARDS)}")
  os.makedirs(workdir, exist_ok=True)
  tr = config.train
  source = sources.open_source(config.data.source)
  steps_per_epoch = tr.steps_per_epoch or pipeline.steps_per_epoch(len(source), tr.global_batch)
  pretrained = pretrained_lib.open_bundle(config)
  frozen_host = frozen_lib.frozen_variables(config, tr.seed + 1, pretrained)
  rt = runtime.create(config, steps_per_epoch, frozen_host)
  loader = pipeline.make_loader(config.data, source, config.model.size, tr.global_batch,
                                jax.process_index(), jax.process_count())
  data_iter = iter(loader)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  log(f"data: {source!r}, {steps_per_epoch} steps per epoch, "
      f"{pipeline.resolve_workers(config.data.workers)} decoding threads, "
      f"{config.data.prefetch} batches prefetched; mesh {dict(rt.mesh.shape)}; "
      f"{jax.device_count()} devices in {jax.process_count()} processes")

  abstract = jax.eval_shape(lambda: runtime.init_state(rt, jax.random.key(tr.seed)))
  restored = checkpointer.restore(
      checkpoint_lib.abstract_with_shardings(abstract, rt.state_sharding), data_iter)
  if restored is None:
    state = runtime.init_state(rt, jax.random.key(tr.seed))
    if pretrained is not None and config.pretrained.start:
      state = pretrained_lib.start_state(state, pretrained, rt.state_sharding)
      log(f"starting from step 0 with {pretrained_lib.describe_start(pretrained)}")
    else:
      log("starting from step 0 with a freshly initialised generator")
  else:
    state, step = restored
    log(f"resumed from the checkpoint of step {step}")
  if started is not None:
    started()
  writer = metrics_lib.Writer(workdir, log)
  del pretrained  # its frozen networks stay in frozen_host
  frozen = runtime.place_frozen(rt, frozen_host)
  samples = _sample_images(rt, source, config.log.samples)
  samples_host = jax.device_get(samples)
  sample_rng = jax.random.key(tr.seed + 2)

  def sample(step):
    out = jax.device_get(rt.sample_step(state, frozen, samples, sample_rng))
    writer.grid(step, "input_anonymized_recovered", [samples_host, out["anon"], out["recovered"]])
    return {"bit_error_rate": float(out["bit_error_rate"]), "recovery_l1": float(out["recovery_l1"])}

  summary = {"start_step": int(state.step)}
  summary["start_sample"] = sample(int(state.step))
  log(f"sample before: bit error rate {summary['start_sample']['bit_error_rate']:.4f}, "
      f"recovery L1 {summary['start_sample']['recovery_l1']:.4f}")

  stop = _Stop()
  pending = _PendingMetrics()
  averages = metrics_lib.IntervalAverages()
  profile = _Profile(os.path.join(os.path.abspath(workdir), "profile"), config.log.profile_steps,
                     log)
  step = int(state.step)
  compile_s = None
  timed = None  # (step, time) when the compiled first step had finished
  last_fetch = None  # (step, time) of the latest fetch after it
  interval = None  # (step, time) where the current logging interval began

  def fetch():
    nonlocal last_fetch
    fetched = pending.fetch()
    for _, scalars in fetched:
      averages.add(scalars)
    if fetched and timed is not None:
      last_fetch = (step, time.time())
    return fetched

  def write_interval():
    nonlocal interval
    values = averages.flush()
    if interval is not None and step > interval[0]:
      values["steps_per_s"] = (step - interval[0]) / (time.time() - interval[1])
      values["images_per_s"] = values["steps_per_s"] * tr.global_batch
    writer.scalars(step, values, CONSOLE_KEYS)
    if timed is not None:
      interval = (step, time.time())

  def steady():
    """The transfer guard (`log.transfer_guard`) over the steps after the first."""
    if timed is None:
      return contextlib.nullcontext()
    return jax.transfer_guard(config.log.transfer_guard)

  def read_batch():
    """The next global batch, with the iterator's position before it (for a rewind)."""
    position = copy.deepcopy(data_iter.get_state())
    return runtime.global_batch(rt, next(data_iter)), position

  previous = None  # metrics of the step before the newest
  try:
    images, position = read_batch() if step < tr.num_steps else (None, None)
    while step < tr.num_steps and not stop.requested:
      with steady():
        t0 = time.time()
        state, metrics = rt.train_step(state, frozen, images)
        images = None
        step += 1
        pending.add(step, metrics)
      if compile_s is None:  # waits once: checks the first step (orbax saves it in a new workdir)
        fetch()
        compile_s = time.time() - t0
        log(f"step {step}: compiled and ran the first step in {compile_s:.1f} s")
        timed = interval = (step, time.time())
      else:
        profile.after(step, metrics)
      # a checkpoint holds only steps whose metrics were checked
      if _due(step, config.checkpoint.every_steps):
        fetch()
      checkpointer.save(step, state, data_iter)
      if _due(step, config.log.every_steps) or step == tr.num_steps:
        fetch()
        write_interval()
      if _due(step, config.log.sample_every_steps):
        sample(step)
      if step == timed[0]:
        profile.start(step + 1, tr.num_steps)
      if step < tr.num_steps:
        with steady():
          images, position = read_batch()  # read and placed while this step runs
          if previous is not None:  # at most one step ahead of the devices
            jax.block_until_ready(previous)
      previous = metrics
    if images is not None:  # stopped with the next batch read: save the position before it
      data_iter.set_state(position)
    if stop.requested:
      log(f"SIGTERM: saving the checkpoint of step {step} and stopping")
    if fetch():
      write_interval()
    checkpointer.save(step, state, data_iter, force=step not in checkpointer.manager.all_steps())
    checkpointer.wait()
  finally:
    profile.stop(step)
    stop.restore()
    checkpointer.close()
    data_iter.close()
  steps_per_s = None
  if timed is not None and last_fetch is not None and last_fetch[0] > timed[0]:
    steps_per_s = (last_fetch[0] - timed[0]) / (last_fetch[1] - timed[1])
  summary.update(end_step=step, compile_and_first_step_s=compile_s, steps_per_s=steps_per_s,
                 stopped_by_signal=stop.requested)
  summary["end_sample"] = sample(step)
  log(f"sample after step {step}: bit error rate {summary['end_sample']['bit_error_rate']:.4f}, "
      f"recovery L1 {summary['end_sample']['recovery_l1']:.4f}")
  writer.close()
  logging.info("training summary: %s", summary)
  return summary
