"""bfloat16 compute with float32 master weights (`train.compute_dtype`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax import models
from g2face_jax.train import precision
from test_train_sharding import _run


def _extractor_loss(module, variables, x):
  def loss(params):
    out, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.tanh(out) ** 2), (out, upd["batch_stats"])
  return jax.value_and_grad(loss, has_aux=True)(variables["params"])


def test_bfloat16_compute_keeps_float32_state(tiny_config):
  nets = models.Networks.from_config(tiny_config.model, models.TRAINING_NETWORKS)
  mixed = precision.compute_in(nets, "bfloat16")
  s = tiny_config.model.size
  x = jax.random.uniform(jax.random.key(1), (2, s, s, 3), jnp.float32, -1.0, 1.0)
  variables = nets.extractor.init(jax.random.key(0), x, train=True)
  (want, (want_out, _)), want_grads = _extractor_loss(nets.extractor, variables, x)
  (got, (got_out, stats)), grads = _extractor_loss(mixed.extractor, variables, x)
  # outputs, updated running statistics and gradients come back float32 ...
  for leaf in [got_out] + jax.tree.leaves(stats) + jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32
  # ... from a bfloat16 computation: different from float32 by bfloat16's rounding
  # (8-bit significand, relative step 2^-8 = 0.4% per operation), not more
  err = float(jnp.max(jnp.abs(got_out - want_out)) / jnp.max(jnp.abs(want_out)))
  assert 1e-4 < err < 5e-2, err
  np.testing.assert_allclose(got, want, rtol=5e-2)
  assert precision.compute_in(nets, "float32") is nets
  with pytest.raises(ValueError, match="unknown compute dtype 'float16'"):
    precision.compute_in(nets, "float16")


@pytest.mark.slow
def test_bfloat16_train_step_losses_match_float32(tmp_path):
  """One whole iteration from the same state and batch: every loss within 5% (the
  bfloat16 rounding of tens of layers), and the iteration's updates move in the same
  direction as float32's."""
  common = "train.global_batch=4,train.replica_batch=2"
  f32 = _run(tmp_path, "f32", 1, common, steps=1)
  bf16 = _run(tmp_path, "bf16", 1, common + ",train.compute_dtype=bfloat16", steps=1)
  assert list(f32["names"]) == list(bf16["names"])
  np.testing.assert_allclose(bf16["losses"], f32["losses"], rtol=5e-2, atol=1e-3)
  deltas = [k for k in f32.files if k.startswith("delta")]
  a = np.concatenate([f32[k].ravel() for k in deltas])
  b = np.concatenate([bf16[k].ravel() for k in deltas])
  assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9
