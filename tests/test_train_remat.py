"""Rematerialisation (`train.remat`): same variables, same numbers, recomputed forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2face_jax import models
from g2face_jax.train import remat as remat_lib


def test_remat_keeps_the_variables(tiny_config):
  nets = models.Networks.from_config(tiny_config.model, models.TRAINING_NETWORKS)
  rematted = remat_lib.remat_networks(nets, "full")
  for name in ("decoder", "extractor", "discriminator"):
    inputs = models.example_inputs(tiny_config.model, name)
    kwargs = {"train": True} if name == "extractor" else {}
    plain = jax.eval_shape(lambda: getattr(nets, name).init(jax.random.key(0), *inputs, **kwargs))
    remat = jax.eval_shape(lambda: getattr(rematted, name).init(jax.random.key(0), *inputs,
                                                                **kwargs))
    assert jax.tree.structure(plain) == jax.tree.structure(remat), name
    assert [x.shape for x in jax.tree.leaves(plain)] == [x.shape for x in jax.tree.leaves(remat)]
    apply = lambda v, m=getattr(rematted, name): m.apply(v, *inputs, mutable=True, **kwargs)  # noqa: E731
    eqns = jax.make_jaxpr(apply)(remat).jaxpr.eqns  # the whole forward is one remat region
    assert [e.primitive.name for e in eqns if e.primitive.name in ("remat2", "checkpoint")], name
  assert remat_lib.remat_networks(nets, "none") is nets
  with pytest.raises(ValueError, match="unknown remat policy"):
    remat_lib.remat_networks(nets, "sometimes")


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_gives_the_same_loss_and_gradients(tiny_config, policy):
  """Train-mode extractor (BatchNorm statistics): loss, gradients and new statistics
  of the rematerialised network equal the plain network's."""
  nets = models.Networks.from_config(tiny_config.model, models.TRAINING_NETWORKS)
  plain = nets.extractor
  rematted = remat_lib.remat_networks(nets, policy).extractor
  s = tiny_config.model.size
  x = jax.random.uniform(jax.random.key(1), (2, s, s, 3), jnp.float32, -1.0, 1.0)
  variables = plain.init(jax.random.key(0), x, train=True)

  def loss(module, params):
    out, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.tanh(out) ** 2), upd["batch_stats"]

  (want, want_stats), want_grads = jax.value_and_grad(
      lambda p: loss(plain, p), has_aux=True)(variables["params"])
  (got, got_stats), got_grads = jax.value_and_grad(
      lambda p: loss(rematted, p), has_aux=True)(variables["params"])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads) + jax.tree.leaves(got_stats),
                  jax.tree.leaves(want_grads) + jax.tree.leaves(want_stats), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
