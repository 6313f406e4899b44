"""Time `g2face bench` of two source trees of this project on the same machine.

    python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--config paper] [--batch 1,4]
        [--rounds 3] [--pairs 3] [--dtype float32] [--huge-pages] [--json]

Each tree is a checkout of this repository (for example `git worktree add
/tmp/old <commit>`). Every pair runs the bench once per tree, each in a fresh
Python process whose PYTHONPATH and working directory are that tree, in
alternating order (old first in even pairs, new first in odd ones) so that a
machine getting busier or quieter during the run does not favour one tree.
A process calls the tree's own bench API (`g2face_jax.tools.bench.run`, or
`g2face_jax.bench.run` in trees older than `tools/`) for every batch size and
prints its records as JSON.

Printed per path (anonymize, recover) and batch: seconds per face of each
tree, best and median over the pairs (each record is already the best of
`--rounds` timed calls after the compiling one), and the ratio new / old of
both (below 1: the new tree is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Iterable, Sequence

from cli_args import parse_batches, positive_int

PATHS = ("anonymize", "recover")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"

# Run inside the child: the tree's own bench, one record per batch size. An editable
# install of another tree adds an import finder that would serve submodules the tree
# lacks (g2face_jax.tools in an older tree) from that other tree: it is removed, and
# every g2face_jax module must come from the tree.
_CHILD = r"""
import json, os, sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not str(getattr(f, "__module__", "")).startswith("__editable__")]
tree = os.getcwd()
import g2face_jax
if os.path.isfile(os.path.join(tree, "g2face_jax", "tools", "bench.py")):
  from g2face_jax.tools import bench
else:
  from g2face_jax import bench
spec = json.loads(sys.argv[1])
records = []
for batch in spec.pop("batches"):
  records.append(bench.run(batch=batch, **spec))
files = [getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())
         if name == "g2face_jax" or name.startswith("g2face_jax.")]
for r in records:
  r["package_files"] = files
print(json.dumps(records))
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="compare_trees.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("old_tree", metavar="OLD_TREE", help="source tree of the older version")
  p.add_argument("new_tree", metavar="NEW_TREE", help="source tree of the newer version")
  p.add_argument("--config", default="paper", help="bench config (default: paper)")
  p.add_argument("--batch", type=parse_batches, default=[1, 4],
                 help="batch sizes, comma-separated (default: 1,4)")
  p.add_argument("--rounds", type=positive_int, default=3,
                 help="timed calls per record after the compiling one (default: 3)")
  p.add_argument("--pairs", type=positive_int, default=3,
                 help="alternating runs of both trees (default: 3)")
  p.add_argument("--dtype", default="float32", help="bench compute dtype (default: float32)")
  p.add_argument("--huge-pages", action="store_true",
                 help=f"start both trees' processes with GLIBC_TUNABLES={HUGE_PAGES_TUNABLE}")
  p.add_argument("--json", action="store_true", help="print the summary rows as JSON")
  args = p.parse_args(argv)
  for name in ("old_tree", "new_tree"):
    tree = os.path.abspath(getattr(args, name))
    if not os.path.isdir(os.path.join(tree, "g2face_jax")):
      p.error(f"{getattr(args, name)}: not a source tree of this project (no g2face_jax/ in it)")
    setattr(args, name, tree)
  return args


def child_environment(tree: str, huge_pages: bool, environ=None) -> dict[str, str]:
  """The environment of a bench process for `tree`: PYTHONPATH is the tree alone."""
  env = dict(os.environ if environ is None else environ)
  env["PYTHONPATH"] = tree
  if huge_pages:
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if HUGE_PAGES_TUNABLE not in tunables:
      tunables.append(HUGE_PAGES_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def run_tree(tree: str, args: argparse.Namespace) -> list[dict]:
  """One fresh process of `tree`'s bench over every batch size -> its records."""
  spec = dict(config=args.config, batches=args.batch, rounds=args.rounds, dtype=args.dtype)
  done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=tree,
                        env=child_environment(tree, args.huge_pages), capture_output=True,
                        text=True)
  if done.returncode:
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    raise SystemExit(f"{tree}: bench failed: {last}")
  records = json.loads(done.stdout.strip().splitlines()[-1])
  for r in records:
    foreign = [f for f in r.pop("package_files") if f and not os.path.abspath(f).startswith(
        tree + os.sep)]
    if foreign:
      raise SystemExit(f"{tree}: the bench imported {foreign[0]}, which is not in this tree "
                       "(an installed copy shadows PYTHONPATH)")
  return records


def order(pair: int) -> tuple[str, str]:
  """Which tree runs first in a pair: old in even pairs, new in odd ones."""
  return ("old", "new") if pair % 2 == 0 else ("new", "old")


def summarize(records: Iterable[dict]) -> list[dict]:
  """Records tagged `tree` ('old' or 'new') -> one row per (batch, path): seconds
  per face of each tree, best and median over its records, and new / old of both."""
  groups: dict[tuple[int, str], dict[str, list[float]]] = {}
  for r in records:
    for path in PATHS:
      times = groups.setdefault((int(r["batch"]), path), {"old": [], "new": []})
      times[r["tree"]].append(float(r[f"{path}_s_per_img"]))
  rows = []
  for (batch, path), times in sorted(groups.items()):
    if not times["old"] or not times["new"]:
      raise ValueError(f"batch {batch} {path}: records of only one tree")
    row = dict(batch=batch, path=path, runs=min(len(times["old"]), len(times["new"])))
    for tree in ("old", "new"):
      row[f"{tree}_best_s"] = min(times[tree])
      row[f"{tree}_median_s"] = statistics.median(times[tree])
    row["ratio_best"] = row["new_best_s"] / row["old_best_s"]
    row["ratio_median"] = row["new_median_s"] / row["old_median_s"]
    rows.append(row)
  return rows


def format_summary(rows: Sequence[dict]) -> str:
  """A fixed-width table of `summarize` rows."""
  lines = ["batch  path       old best / median s   new best / median s   new/old best   median"]
  for r in rows:
    lines.append(f"{r['batch']:5d}  {r['path']:9s}  {r['old_best_s']:8.3f} / {r['old_median_s']:7.3f}"
                 f"     {r['new_best_s']:8.3f} / {r['new_median_s']:7.3f}"
                 f"     {r['ratio_best']:10.3f}   {r['ratio_median']:6.3f}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  trees = {"old": args.old_tree, "new": args.new_tree}
  records, device = [], None
  for pair in range(args.pairs):
    for name in order(pair):
      for r in run_tree(trees[name], args):
        r["tree"] = name
        device = r.get("device", device)
        records.append(r)
      print(f"pair {pair + 1}/{args.pairs}: {name} done", file=sys.stderr, flush=True)
  rows = summarize(records)
  if args.json:
    print(json.dumps(dict(device=device, config=args.config, rounds=args.rounds,
                          pairs=args.pairs, dtype=args.dtype, rows=rows)))
  else:
    print(f"{args.config}, {args.dtype}, {args.pairs} pairs of fresh processes, each record the "
          f"best of {args.rounds}; {device}")
    print(f"old: {args.old_tree}\nnew: {args.new_tree}")
    print(format_summary(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
