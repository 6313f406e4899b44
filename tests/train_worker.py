"""Runs a few tiny-config training steps in a fresh process (device count, mesh and
resume behaviour set from the command line) and saves the losses, the parameters, their changes (final - initial) and the BatchNorm statistics.

Used by the sharding and multi-process tests: `python tests/train_worker.py OUT.npz STEPS
[OVERRIDES [COORDINATOR NUM_PROCESSES PROCESS_ID]]` with config overrides (e.g.
mesh.fsdp=2,train.global_batch=8). With the last three, the process joins a
jax.distributed run and feeds its own slice of every global batch.
"""
import sys

import jax
import numpy as np

from g2face_jax import config as config_lib
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import runtime


def main(out, steps, overrides, distributed=()):
  if distributed:
    coordinator, num_processes, process_id = distributed
    runtime.initialize_distributed(coordinator, int(num_processes), int(process_id))
  config = config_lib.load("tiny" + ("," + overrides if overrides else ""))
  frozen = frozen_lib.frozen_variables(config, 1)
  rt = runtime.create(config, steps_per_epoch=3, frozen=frozen)
  state = runtime.init_state(rt, jax.random.key(config.train.seed))
  frozen = runtime.place_frozen(rt, frozen)
  initial = jax.device_get((state.params, state.disc_params))
  rng = np.random.default_rng(0)
  b, s = config.train.global_batch, config.model.size
  losses = []
  for _ in range(steps):
    images = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    local = np.split(images, jax.process_count())[jax.process_index()]
    state, metrics = rt.train_step(state, frozen, runtime.global_batch(rt, local))
    losses.append([float(metrics[k]) for k in sorted(metrics)])
  final = jax.device_get((state.params, state.disc_params))
  deltas = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), final, initial)
  flat = {"delta" + jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(deltas)}
  flat.update({"final" + jax.tree_util.keystr(p): np.asarray(v)
               for p, v in jax.tree_util.tree_leaves_with_path(final)})
  flat.update({"stats" + jax.tree_util.keystr(p): np.asarray(v)
               for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(state.batch_stats))})
  np.savez(out, losses=np.asarray(losses), names=np.asarray(sorted(metrics)), **flat)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "", sys.argv[4:7])
