"""Shared test set-up: float32 at highest matmul/conv precision, and the parity fixtures."""
import os

import jax
import pytest

from g2face_jax.parity import nhwc, rel_err  # noqa: F401  (shared by the tests)

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = os.environ.get(
    "G2FACE_PARITY_FIXTURES",
    os.path.join(os.path.dirname(__file__), "fixtures", "official", "official-seed0"))


@pytest.fixture(scope="session")
def fixtures_dir():
  return FIXTURES
