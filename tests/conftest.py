"""Shared test set-up: float32 at highest matmul/conv precision, and the parity fixtures."""
import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.environ.get(
    "G2FACE_PARITY_FIXTURES",
    os.path.join(os.path.dirname(__file__), "fixtures", "official", "official-seed0"))


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref|, the parity measure of the fixtures' README."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nhwc(a):
  """(B,C,H,W) fixture array -> (B,H,W,C)."""
  return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES
