"""Argument types the benchmark scripts share (they run as `python benchmarks/X.py`)."""
from __future__ import annotations

import argparse


def parse_batches(text: str) -> list[int]:
  """'1,4' -> [1, 4]."""
  try:
    batches = [int(b) for b in text.split(",") if b.strip()]
  except ValueError:
    batches = []
  if not batches or min(batches) < 1:
    raise argparse.ArgumentTypeError(f"'{text}': expected comma-separated positive integers")
  return batches


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"'{text}': expected a positive integer")
  return value
