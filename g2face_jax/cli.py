"""The `g2face` command. Thin: parses arguments and calls the package."""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests", "fixtures", "official", "official-seed0")


def _parity(args) -> int:
  from g2face_jax import parity
  folder = args.fixtures
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"{folder}: fixture folder not found")
  names = args.only.split(",") if args.only else None
  unknown = sorted(set(names or ()) - set(parity.CHECKS))
  if unknown:
    raise ValueError(f"unknown check(s) {unknown}; known: {sorted(parity.CHECKS)}")
  print(f"official parity on {folder} (tolerance {parity.TOLERANCE:.0e})")
  results = parity.run(folder, names)
  worst = max(err for r in results.values() for err in r.values())
  print(f"worst relative error {worst:.2e}: {'PASS' if worst <= parity.TOLERANCE else 'FAIL'}")
  return 0 if worst <= parity.TOLERANCE else 1


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="g2face", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("parity", help="convert the official fixtures' recipe weights and print "
                     "the relative error of every network against the official outputs")
  p.add_argument("--fixtures", default=os.environ.get("G2FACE_PARITY_FIXTURES", DEFAULT_FIXTURES),
                 help="fixture folder (official-seedN layout); default: the bundled seed 0")
  p.add_argument("--only", help="comma-separated checks to run (default: all)")
  p.set_defaults(run=_parity)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.run(args)
  except (OSError, ValueError, KeyError) as e:
    print(f"g2face {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
