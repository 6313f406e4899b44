"""Optimizer groups, the Adam update and the learning-rate schedule of the official recipe."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from g2face_jax.nn import bfm as bfm_lib
from g2face_jax.train import frozen, state


def _train(**overrides):
  t = ml_collections.ConfigDict(dict(lr=1e-3, pretrained_lr_mult=0.1, adam_b1=0.0, adam_b2=0.999,
                                     adam_eps=1e-8, warmup_epochs=10, decay_per_epoch=0.95))
  t.update(overrides)
  return t


def _params(rng):
  leaf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"decoder": {"pyramid_0": {"w": leaf(3, 2)}, "fusion_mask_1": {"w": leaf(2)},
                      "hiding_injects_0": {"w": leaf(2)}, "convs_0": {"w": leaf(4)},
                      "input": {"input": leaf(1, 2)}, "to_rgb1": {"b": leaf(3)}},
          "style_mapper": {"l": {"w": leaf(2, 2)}}, "map_2_id": {"fc1": {"k": leaf(2)}},
          "extractor": {"c": {"k": leaf(2)}}}


def test_groups_follow_the_official_split():
  labels = state.generator_labels(_params(np.random.default_rng(0)))
  assert labels["decoder"]["pyramid_0"]["w"] == "new"
  assert labels["decoder"]["fusion_mask_1"]["w"] == "new"
  assert labels["decoder"]["hiding_injects_0"]["w"] == "new"
  assert labels["decoder"]["convs_0"]["w"] == "pretrained"
  assert labels["decoder"]["input"]["input"] == "pretrained"
  assert labels["decoder"]["to_rgb1"]["b"] == "pretrained"
  assert labels["style_mapper"]["l"]["w"] == "new"
  assert labels["extractor"]["c"]["k"] == "new"
  assert labels["map_2_id"]["fc1"]["k"] == "map_2_id"


@pytest.mark.parametrize("epoch,want", [(1, 1e-4), (5, 5e-4), (10, 1e-3), (11, 1e-3),
                                        (12, 0.95e-3), (20, 1e-3 * 0.95 ** 9)])
def test_schedule_warmup_then_decay(epoch, want):
  np.testing.assert_allclose(state.epoch_learning_rate(_train(), epoch), want, rtol=1e-6)
  rates = state.group_learning_rates(_train(), epoch)
  np.testing.assert_allclose(rates["pretrained"], 0.1 * want, rtol=1e-6)


def test_schedule_without_warmup():
  np.testing.assert_allclose(state.epoch_learning_rate(_train(warmup_epochs=0), 1), 1e-3)
  np.testing.assert_allclose(state.epoch_learning_rate(_train(warmup_epochs=0), 3), 1e-3 * 0.95 ** 2)


class TorchAdam:
  """NumPy transcription of torch.optim.Adam (one parameter): step counts per parameter."""

  def __init__(self, b1, b2, eps):
    self.b1, self.b2, self.eps, self.t, self.m, self.v = b1, b2, eps, 0, 0.0, 0.0

  def step(self, p, g, lr):
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return p - lr * m_hat / (np.sqrt(v_hat) + self.eps)


def test_updates_match_torch_adam_with_groups_and_a_skipped_group():
  """Three updates: all groups, then one where map_2_id's gradient is None (the recover
  step: no move, no step count), then all again. Compared leaf by leaf with NumPy Adam."""
  rng = np.random.default_rng(1)
  params = _params(rng)
  train = _train()
  tx = state.generator_optimizer(train)
  opt_state = tx.init(params)
  labels = jax.tree.leaves(state.generator_labels(params))
  ref_params = [np.asarray(p, np.float64) for p in jax.tree.leaves(params)]
  ref_opt = [TorchAdam(0.0, 0.999, 1e-8) for _ in ref_params]
  for epoch, frozen_labels in [(1, ()), (1, ("map_2_id",)), (2, ())]:
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    params, opt_state = state.apply_generator_update(tx, train, params, opt_state, grads,
                                                     jnp.int32(epoch), frozen_labels)
    rates = state.group_learning_rates(train, epoch)
    for i, (g, lab) in enumerate(zip(jax.tree.leaves(grads), labels)):
      if lab not in frozen_labels:
        ref_params[i] = ref_opt[i].step(ref_params[i], np.asarray(g, np.float64), float(rates[lab]))
  for got, want in zip(jax.tree.leaves(params), ref_params):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert ref_opt[labels.index("map_2_id")].t == 2 and ref_opt[0].t == 3


def test_synthetic_bfm_runs_the_geometry_and_has_normals():
  model = frozen.synthetic_bfm()
  assert model.point_buf.max() == model.face_buf.shape[0]  # padding points at the zero normal
  coeffs = jnp.asarray(np.random.default_rng(0).standard_normal((2, 257)) * 0.1, jnp.float32)
  shape, landmark, color = bfm_lib.compute_for_loss(model, coeffs)
  assert shape.shape == (2, 144, 3) and landmark.shape == (2, 68, 2) and color.shape == (2, 144, 3)
  normals = bfm_lib.vertex_normals(model, shape)
  np.testing.assert_allclose(jnp.linalg.norm(normals, axis=-1), 1.0, rtol=1e-5)
  assert np.isfinite(np.asarray(landmark)).all()
