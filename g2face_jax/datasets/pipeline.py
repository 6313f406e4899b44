"""The Grain input pipeline of training: a seeded, sharded, checkpointable stream of
this process's slice of every global batch, (B / process_count, S, S, 3) float32 in [-1, 1].

Records are shuffled with `data.shuffle_seed` anew every epoch, split between
processes (each process reads every process_count-th record of the shuffled
order), decoded and resized in `data.workers` worker processes. The iterator's
position is saved with checkpoints (`grain.checkpoint.CheckpointSave`).
"""
from __future__ import annotations

import grain
import ml_collections

from g2face_jax.datasets import transforms


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  """Full global batches per pass over the data (the official drop-last epochs)."""
  steps = num_records // global_batch
  if steps < 1:
    raise ValueError(f"{num_records} images are fewer than one global batch of {global_batch}")
  return steps


def make_loader(data: ml_collections.ConfigDict, source, size: int, global_batch: int,
                process_index: int = 0, process_count: int = 1) -> grain.DataLoader:
  """Endless loader of this process's local batches from `source` (see `sources`)."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True),
      shuffle=True, num_epochs=None, seed=data.shuffle_seed)
  operations = [transforms.DecodeResize(size)]
  if data.flip:
    operations.append(transforms.RandomFlip())
  operations += [transforms.ToUnitRange(),
                 grain.transforms.Batch(global_batch // process_count, drop_remainder=True)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=data.workers, read_options=None,
                          worker_buffer_size=max(1, data.prefetch))
