"""The Grain input pipeline of training: a seeded, sharded, checkpointable stream of
this process's slice of every global batch, (B / process_count, S, S, 3) float32 in [-1, 1].

Records are shuffled with `data.shuffle_seed` anew every epoch (drop-last: the
records beyond a multiple of process_count are left out), and process p reads
records p, p + process_count, ... of that stream. Records are decoded and
resized by `data.workers` threads (-1: `auto_workers()`), and `data.prefetch`
whole batches are assembled ahead in a background thread, so the next batches
are ready while the accelerator computes.

Threads rather than worker processes: PIL's decoders and resize and NumPy's
conversions release the GIL, no process has to start (and import JAX), and the
order of the records and the iterator's position (`get_state`, saved with the
checkpoints by `grain.checkpoint.CheckpointSave`) do not depend on the number
of threads, so a run resumes exactly on a machine with another core count.
"""
from __future__ import annotations

import os

import grain
import ml_collections

from g2face_jax.datasets import transforms

MAX_WORKERS = 16


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  """Full global batches per pass over the data (the official drop-last epochs)."""
  steps = num_records // global_batch
  if steps < 1:
    raise ValueError(f"{num_records} images are fewer than one global batch of {global_batch}")
  return steps


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, else the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def auto_workers(cores: int | None = None) -> int:
  """Decoding threads for `data.workers=-1`: none on 1 or 2 cores (the prefetch thread
  decodes alone; XLA and the training loop need those cores), else half the cores, at
  most MAX_WORKERS."""
  cores = available_cores() if cores is None else cores
  return 0 if cores <= 2 else min(cores // 2, MAX_WORKERS)


def resolve_workers(workers: int) -> int:
  """`data.workers` -> the number of decoding threads (-1: `auto_workers()`)."""
  if workers == -1:
    return auto_workers()
  if workers < 0:
    raise ValueError(f"data.workers must be -1 (auto) or >= 0, not {workers}")
  return workers


def make_loader(data: ml_collections.ConfigDict, source, size: int, global_batch: int,
                process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless dataset of this process's local batches from `source` (see `sources`);
  `iter()` gives a checkpointable `grain.DatasetIterator`."""
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
  if data.prefetch < 0:
    raise ValueError(f"data.prefetch must be >= 0, not {data.prefetch}")
  records = len(source) // process_count * process_count
  if records < 1:
    raise ValueError(f"{len(source)} images are fewer than the {process_count} processes")
  local_batch = global_batch // process_count
  workers = resolve_workers(data.workers)
  ds = grain.MapDataset.source(source)[:records].seed(data.shuffle_seed).shuffle().repeat()
  ds = ds.map(transforms.DecodeResize(size))
  if data.flip:
    ds = ds.random_map(transforms.RandomFlip())
  ds = ds.map(transforms.ToUnitRange())[process_index::process_count]
  buffered = local_batch * max(1, data.prefetch) if workers else 0  # records decoded ahead
  read = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=buffered)
  ds = ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
  if data.prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=data.prefetch)
  return ds
