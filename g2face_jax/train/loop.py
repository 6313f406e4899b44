"""The training job: data, the sharded step, checkpoints, metrics and sample grids.

`train(config, workdir)` runs `config.train.num_steps` iterations (resuming
from the newest readable checkpoint in workdir/checkpoints, else starting from
the bundle of `pretrained.bundle` as `pretrained` describes), saves on SIGTERM
and at the end, and returns a summary (compile time, steps/s, sample bit error
rate and recovery L1 before and after).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time

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


def _sample_images(rt: runtime.Runtime, source, count: int) -> jax.Array:
  """The first images of the source (no flip), as a global batch of a multiple of the devices."""
  n = max(1, math.ceil(count / rt.mesh.size)) * rt.mesh.size
  decode_resize = transforms.DecodeResize(rt.config.model.size)
  pixels = np.stack([decode_resize.map(source[i % len(source)]) for i in range(n)])
  batch = transforms.ToUnitRange().map(pixels)
  return jax.make_array_from_callback(batch.shape, rt.batch_sharding, lambda idx: batch[idx])


def train(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict:
  """Run (or resume) training in workdir; returns a summary dict of measured figures."""
  for line in pretrained_lib.preflight(config):  # refuses a run missing what it needs
    log(line)
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
  writer = metrics_lib.Writer(workdir, log)
  log(f"data: {source!r}, {steps_per_epoch} steps per epoch; mesh {dict(rt.mesh.shape)}; "
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
  del pretrained  # its frozen networks stay in frozen_host
  frozen = runtime.place_frozen(rt, frozen_host)
  samples = _sample_images(rt, source, config.log.samples)
  sample_rng = jax.random.key(tr.seed + 2)

  def sample(step):
    out = jax.device_get(rt.sample_step(state, frozen, samples, sample_rng))
    writer.grid(step, "input_anonymized_recovered",
                [np.asarray(samples), out["anon"], out["recovered"]])
    return {"bit_error_rate": float(out["bit_error_rate"]), "recovery_l1": float(out["recovery_l1"])}

  summary = {"start_step": int(state.step)}
  summary["start_sample"] = sample(int(state.step))
  log(f"sample before: bit error rate {summary['start_sample']['bit_error_rate']:.4f}, "
      f"recovery L1 {summary['start_sample']['recovery_l1']:.4f}")

  stop = _Stop()
  averages = metrics_lib.IntervalAverages()
  step = int(state.step)
  timed_steps, timed_seconds, compile_s = 0, 0.0, None
  interval_start, interval_steps = time.time(), 0
  try:
    while step < tr.num_steps and not stop.requested:
      images = runtime.global_batch(rt, next(data_iter))
      t0 = time.time()
      state, metrics = rt.train_step(state, frozen, images)
      metrics = jax.device_get(metrics)  # also waits for the step
      step += 1
      if compile_s is None:
        compile_s = time.time() - t0
        log(f"step {step}: compiled and ran the first step in {compile_s:.1f} s")
        interval_start, interval_steps = time.time(), 0
      else:
        timed_steps += 1
        timed_seconds += time.time() - t0
        interval_steps += 1
      if not all(np.isfinite(v) for v in metrics.values()):
        bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
        raise FloatingPointError(f"step {step}: non-finite {bad}; stopping")
      averages.add(metrics)
      checkpointer.save(step, state, data_iter)
      if step % config.log.every_steps == 0 or step == tr.num_steps:
        values = averages.flush()
        elapsed = time.time() - interval_start
        if interval_steps:
          values["steps_per_s"] = interval_steps / elapsed
          values["images_per_s"] = values["steps_per_s"] * tr.global_batch
        writer.scalars(step, values, CONSOLE_KEYS)
        interval_start, interval_steps = time.time(), 0
      if config.log.sample_every_steps and step % config.log.sample_every_steps == 0:
        sample(step)
    if stop.requested:
      log(f"SIGTERM: saving the checkpoint of step {step} and stopping")
    checkpointer.save(step, state, data_iter, force=step not in checkpointer.manager.all_steps())
    checkpointer.wait()
  finally:
    stop.restore()
    checkpointer.close()
  summary.update(end_step=step, compile_and_first_step_s=compile_s,
                 steps_per_s=timed_steps / timed_seconds if timed_seconds else None,
                 stopped_by_signal=stop.requested)
  summary["end_sample"] = sample(step)
  log(f"sample after step {step}: bit error rate {summary['end_sample']['bit_error_rate']:.4f}, "
      f"recovery L1 {summary['end_sample']['recovery_l1']:.4f}")
  writer.close()
  logging.info("training summary: %s", summary)
  return summary
