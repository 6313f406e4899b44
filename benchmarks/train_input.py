"""Training steps/s with the host synchronising every step against the overlapped defaults.

    python benchmarks/train_input.py [--config smoke] [--steps 16] [--pairs 2]
        [--source demo] [--json]
    python benchmarks/train_input.py --loader-only [--config smoke] [--source DIR]
        [--batches 200] [--workers 0,1,2,4]

Training (`g2face_jax.train.loop.train`, random weights, a fresh workdir per
run), all runs in this one process, alternating (before first in even pairs,
after first in odd ones, so that a machine getting busier or quieter does not
favour one):
  before  data.workers=0, data.prefetch=0, log.every_steps=1: records decoded
          in the loop's thread when a step needs them and the metrics fetched
          (and logged) after every step, so the host waits for each step
          (the defaults before input and compute overlapped);
  after   the config's defaults (decoding threads by core count, batches
          prefetched, metrics fetched every `log.every_steps`).
steps/s is the loop's own figure: iterations after the compiled first one
over the wall time until the last one's metrics were fetched. The compiled
programs are kept in a compilation cache in a temporary folder, so only the
first run compiles.

`--loader-only` times the input pipeline alone (local batches/s of
`datasets.pipeline.make_loader`) for each `data.workers`, prefetch on.

Prints the runs and the median steps/s of each side with the ratio after /
before (above 1: the new defaults are faster), or JSON with `--json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from cli_args import positive_int

BEFORE = "data.workers=0,data.prefetch=0,log.every_steps=1"
AFTER = ""  # the defaults
RUN = "log.sample_every_steps=0,log.samples={samples},checkpoint.every_steps=100000"


def _train_runs(args, log) -> list[dict]:
  import jax
  from g2face_jax import config as config_lib
  from g2face_jax.train import loop

  samples = jax.device_count()
  runs = []
  with tempfile.TemporaryDirectory(prefix="train_input_") as root:
    for pair in range(args.pairs):
      order = ("before", "after") if pair % 2 == 0 else ("after", "before")
      for side in order:
        overrides = [f"train.num_steps={args.steps}", f"data.source={args.source}",
                     RUN.format(samples=samples), BEFORE if side == "before" else AFTER]
        spec = ",".join([args.config] + [o for o in overrides if o])
        t0 = time.time()
        summary = loop.train(config_lib.load(spec), os.path.join(root, f"{pair}_{side}"),
                             log=lambda line: None)
        runs.append(dict(pair=pair, side=side, config=spec, steps_per_s=summary["steps_per_s"],
                         compile_and_first_step_s=summary["compile_and_first_step_s"],
                         wall_s=time.time() - t0))
        log(f"pair {pair} {side}: {summary['steps_per_s']:.4f} steps/s (first step "
            f"{summary['compile_and_first_step_s']:.1f} s, run {time.time() - t0:.0f} s)")
  return runs


def _loader_runs(args, log) -> list[dict]:
  from g2face_jax import config as config_lib
  from g2face_jax.datasets import pipeline, sources

  config = config_lib.load(f"{args.config},data.source={args.source}")
  source = sources.open_source(config.data.source)
  runs = []
  for workers in args.workers:
    data = config.data.copy_and_resolve_references()
    data.workers = workers
    it = iter(pipeline.make_loader(data, source, config.model.size, config.train.global_batch))
    next(it)  # threads started, first batch out
    t0 = time.time()
    for _ in range(args.batches):
      next(it)
    seconds = time.time() - t0
    it.close()
    runs.append(dict(workers=workers, threads=pipeline.resolve_workers(workers),
                     batches_per_s=args.batches / seconds))
    log(f"data.workers={workers}: {args.batches / seconds:.1f} batches/s")
  return runs


def _median(runs, side):
  values = [r["steps_per_s"] for r in runs if r["side"] == side]
  return statistics.median(values) if values else None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="smoke", help="config variant and overrides (default smoke)")
  p.add_argument("--steps", type=positive_int, default=16, help="iterations per training run")
  p.add_argument("--pairs", type=positive_int, default=2, help="before/after pairs")
  p.add_argument("--source", default="demo", help="data.source (default: the demo faces)")
  p.add_argument("--loader-only", action="store_true", help="time the input pipeline alone")
  p.add_argument("--batches", type=positive_int, default=200, help="batches per loader timing")
  p.add_argument("--workers", default="0,1,2,-1",
                 type=lambda s: [int(w) for w in s.split(",") if w.strip()],
                 help="data.workers values for --loader-only (-1: auto)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  args = p.parse_args(argv)

  from g2face_jax import platforms
  platforms.use_cpu_when_nothing_else_runs()
  import jax
  from g2face_jax.datasets import pipeline

  if not args.loader_only:  # before anything compiles: every run after the first loads the programs
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="train_input_xla_"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  log = (lambda line: print(line, file=sys.stderr)) if args.json else print
  result = dict(command=" ".join(["python", "benchmarks/train_input.py"] + sys.argv[1:]),
                devices=[str(d) for d in jax.devices()],
                cores=pipeline.available_cores(), auto_workers=pipeline.auto_workers())
  if args.loader_only:
    result["loader"] = _loader_runs(args, log)
  else:
    runs = _train_runs(args, log)
    before, after = _median(runs, "before"), _median(runs, "after")
    result.update(runs=runs, before=BEFORE, median_steps_per_s_before=before,
                  median_steps_per_s_after=after, after_over_before=after / before)
    log(f"median steps/s: before {before:.4f}, after {after:.4f}, after / before "
        f"{after / before:.3f} ({result['cores']} cores, {len(result['devices'])} devices)")
  if args.json:
    print(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
