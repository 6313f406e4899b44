"""The train step: replica-group batch coupling (fast) and one tiny-config iteration (slow)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax import config as config_lib
from g2face_jax.nn import mapping
from g2face_jax.train import frozen as frozen_lib
from g2face_jax.train import losses, runtime
from g2face_jax.train import step as step_lib


def test_batchnorm_runs_per_replica_group_and_averages_running_stats():
  """Map2ID in train mode on 6 samples in groups of 3: each group normalised by its own
  batch statistics (as on each official GPU); running stats = mean of the groups' updates."""
  net = mapping.Map2ID(features=8)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((6, 8)), jnp.float32)
  variables = net.init(jax.random.key(0), z[:2])
  out, stats = step_lib._bn_apply(net, variables["params"], variables["batch_stats"], z, 3)
  for g in range(2):
    part, upd = net.apply(variables, z[3 * g:3 * g + 3], train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out[3 * g:3 * g + 3], part, rtol=1e-5, atol=1e-6)
  per_group = [net.apply(variables, z[3 * g:3 * g + 3], train=True, mutable=["batch_stats"])[1]
               for g in range(2)]
  want = jax.tree.map(lambda a, b: (a + b) / 2, *[p["batch_stats"] for p in per_group])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), stats, want)


def test_diversity_is_a_mean_over_groups():
  ids = jnp.asarray(np.random.default_rng(1).standard_normal((8, 16)), jnp.float32)
  grouped = jnp.mean(step_lib._grouped(losses.identity_diversity_loss, 4, ids))
  want = (losses.identity_diversity_loss(ids[:4]) + losses.identity_diversity_loss(ids[4:])) / 2
  np.testing.assert_allclose(grouped, want, rtol=1e-6)
  with pytest.raises(ValueError, match="replica_batch"):
    step_lib._grouped(losses.identity_diversity_loss, 3, ids)


@pytest.mark.slow
def test_one_tiny_iteration_updates_everything_and_reports_finite_losses():
  config = config_lib.load("tiny")
  frozen = frozen_lib.frozen_variables(config, 1)
  rt = runtime.create(config, steps_per_epoch=5, frozen=frozen)
  state = runtime.init_state(rt, jax.random.key(0))
  before = jax.device_get(state)
  images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
  state, metrics = rt.train_step(state, runtime.place_frozen(rt, frozen),
                                 runtime.global_batch(rt, images))
  metrics = jax.device_get(metrics)
  assert int(state.step) == 1
  assert all(np.isfinite(v) for v in metrics.values())
  assert 0.3 < metrics["anon/bit_error_rate"] < 0.7  # untrained extractor: near chance
  np.testing.assert_allclose(metrics["lr"], config.train.lr / config.train.warmup_epochs)
  after = jax.device_get(state)
  for net in ("decoder", "style_mapper", "map_2_id", "extractor"):
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params[net]),
                                                     jax.tree.leaves(after.params[net]))]
    assert any(moved), net
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.disc_params),
                                                      jax.tree.leaves(after.disc_params)))
  # map_2_id: one Adam step (anonymize only); the others two (anonymize and recover)
  counts = {k: int(v.inner_state.count) for k, v in after.opt_state.inner_states.items()}
  assert counts == {"new": 2, "pretrained": 2, "map_2_id": 1}
