"""Our training iteration against the official one (`train_step.npz` of the parity
fixture folder, `G2FACE_PARITY_FIXTURES`; the repository keeps a trimmed copy) with
the tolerances its README gives: the learning rates of the first epoch, and Adam's
first step fed the recorded gradients (the README's isolated optimizer check).
"""
import jax
import numpy as np
import pytest

from g2face_jax import payload
from g2face_jax.tools import train_parity as tp
from g2face_jax.train import state as state_lib
from g2face_jax.train import step as step_lib


@pytest.fixture(scope="module")
def official(fixtures_dir):
  """The fixture, our settings for it and the generator side at the recipe weights
  (the Adam check needs no frozen network)."""
  fixture = tp.load(fixtures_dir)
  config = tp.config_for(fixture)
  variables = tp.converted_with(fixtures_dir, {})
  params = {n: variables[n]["params"] for n in state_lib.GENERATOR_NETS}
  return dict(folder=fixtures_dir, fx=fixture,
              settings=step_lib.Settings.from_config(config, steps_per_epoch=1_000_000),
              params=params, opt_state=state_lib.generator_optimizer(config.train).init(params),
              names=tp.official_names(fixtures_dir))


def _named(tree, names):
  """{official name: leaf} of a params tree of one network."""
  return dict(zip(jax.tree.leaves(names), jax.tree.leaves(tree)))


def test_the_recorded_draws_fill_the_steps_seam(official):
  """The fixture's draws have the structure of the step's own `draw`, and their hidden
  bits are the official iteration's bits."""
  fx, settings = official["fx"], official["settings"]
  draws = tp.draws(fx)
  b, size = tp.batch_of(fx), int(fx["image"].shape[-1])
  own = step_lib.draw(jax.random.key(0), b, size, settings.train.hiding_input_noise)
  assert jax.tree.structure(draws) == jax.tree.structure(own)
  assert [a.shape for a in jax.tree.leaves(draws)] == [a.shape for a in jax.tree.leaves(own)]
  np.testing.assert_array_equal(payload.float_to_bits(draws.anon_source), fx["anon_bits"])
  np.testing.assert_array_equal(payload.float_to_bits(draws.rec_source), fx["rec_bits"])
  np.testing.assert_allclose(np.std(draws.input_noise), settings.train.hiding_input_noise,
                             rtol=0.05)


def test_learning_rates_of_the_first_epoch(official):
  fx, train = official["fx"], official["settings"].train
  rates = state_lib.group_learning_rates(train, 1)
  np.testing.assert_allclose(float(rates["new"]), float(fx["lr_new"]), rtol=1e-6)
  np.testing.assert_allclose(float(rates["map_2_id"]), float(fx["lr_new"]), rtol=1e-6)
  np.testing.assert_allclose(float(rates["pretrained"]), float(fx["lr_pretrained"]), rtol=1e-6)
  assert train.disc_lr == float(fx["lr_disc"])


def test_adam_first_step_from_the_recorded_gradients(official):
  """Recipe weights and the recorded anonymize gradients through our optimizer give the
  recorded update wherever the gradient is clearly nonzero (|g| > 0.01 rms of its
  tensor): within 0.01 lr plus one float32 ulp of the weight; |update| <= lr (plus an
  ulp) always."""
  fx, folder, params0 = official["fx"], official["folder"], official["params"]
  train = official["settings"].train
  recorded = {k.split("/", 1)[1] for k in fx if k.startswith("after_anon/")}
  recorded = {n for n in recorded if f"grad/anon/{n}" in fx}
  assert recorded, "the fixture holds no full anonymize gradients"
  grads_tree = tp.converted_with(folder, {n: fx[f"grad/anon/{n}"] for n in recorded})
  after_tree = tp.converted_with(folder, {n: fx[f"after_anon/{n}"] for n in recorded})
  grads = {net: jax.tree.map(lambda name, g: g if name in recorded else np.zeros_like(g),
                             official["names"][net], grads_tree[net]["params"])
           for net in params0}
  tx = state_lib.generator_optimizer(train)
  update = jax.jit(lambda p, o, g: state_lib.apply_generator_update(tx, train, p, o, g, 1))
  params, _ = update(params0, official["opt_state"], grads)
  rates = state_lib.group_learning_rates(train, 1)
  labels = state_lib.generator_labels(params0)
  checked = 0
  for net in params0:
    for name, new, old, after, g, label in zip(
        jax.tree.leaves(official["names"][net]), jax.tree.leaves(params[net]),
        jax.tree.leaves(params0[net]), jax.tree.leaves(after_tree[net]["params"]),
        jax.tree.leaves(grads_tree[net]["params"]), jax.tree.leaves(labels[net])):
      if name not in recorded:
        continue
      lr = float(rates[label])
      ours, ref = np.asarray(new, np.float64) - old, np.asarray(after, np.float64) - old
      ulp = np.spacing(np.abs(np.asarray(old, np.float32))).astype(np.float64)
      assert np.all(np.abs(ours) <= lr * (1 + 1e-6) + ulp), name
      g = np.asarray(g, np.float64)
      clear = np.abs(g) > 0.01 * np.sqrt(np.mean(g ** 2))
      assert np.all((np.abs(ours - ref) <= 0.01 * lr + ulp)[clear]), name
      checked += 1
  assert checked == len(recorded)
