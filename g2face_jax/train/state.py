"""Train state, optimizer groups and the learning-rate schedule of the official recipe.

Generator side (one Adam, betas (0, 0.999)), grouped by label:
  'new'        pyramid, fusion masks and hiding injections of the decoder, the style
               mapper and the extractor: base lr
  'map_2_id'   the dummy-identity net: base lr, a group of its own because the
               official recover update leaves it alone (its gradient is None there,
               so PyTorch's Adam neither moves it nor advances its step count)
  'pretrained' the decoder's StyleGAN2 synthesis layers: base lr x pretrained_lr_mult
Discriminator: its own Adam at a constant disc_lr.
Adam acts on the stored (unscaled) parameters; equalized layers keep their run-time gain.
"""
from __future__ import annotations

import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from g2face_jax import models

GENERATOR_NETS = ("decoder", "style_mapper", "map_2_id", "extractor")
BATCH_STAT_NETS = ("map_2_id", "extractor")
LABELS = ("new", "map_2_id", "pretrained")
_NEW_DECODER_PARTS = re.compile(r"^(pyramid|fusion_mask|hiding_injects)_\d+$")


@flax.struct.dataclass
class TrainState:
  """Everything a resume needs besides the data iterator.

  step: () int32, iterations done. params: {GENERATOR_NETS: params}.
  batch_stats: {BATCH_STAT_NETS: running BatchNorm statistics}.
  opt_state: generator Adam (optax multi_transform over LABELS).
  disc_params, disc_opt_state: the discriminator and its Adam.
  rng: the base key; iteration t draws from fold_in(rng, t).
  """
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: Any
  disc_params: dict
  disc_opt_state: Any
  rng: jax.Array


def generator_labels(params: dict) -> dict:
  """The optimizer group (one of LABELS) of every generator parameter."""
  def label(net, top):
    if net == "map_2_id":
      return "map_2_id"
    if net == "decoder" and not _NEW_DECODER_PARTS.match(top):
      return "pretrained"
    return "new"

  return {net: {top: jax.tree.map(lambda _, n=net, t=top: label(n, t), sub)
                for top, sub in tree.items()}
          for net, tree in params.items()}


def _adam_direction(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)


def generator_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam directions per group; the step scales them by `group_learning_rates`."""
  return optax.multi_transform({name: _adam_direction(train) for name in LABELS},
                               generator_labels)


def discriminator_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.adam(train.disc_lr, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)


def epoch_learning_rate(train: ml_collections.ConfigDict, epoch: jax.Array) -> jax.Array:
  """Base lr of 1-based `epoch`: lr * e / W for e <= W (W = warmup_epochs), lr at W + 1,
  then x decay_per_epoch each epoch (the official GradualWarmupScheduler + ExponentialLR)."""
  e = jnp.asarray(epoch, jnp.float32)
  w = train.warmup_epochs
  decayed = train.lr * jnp.power(jnp.float32(train.decay_per_epoch), jnp.maximum(e - w - 1, 0.0))
  if w <= 0:
    return decayed
  return jnp.where(e <= w, train.lr * e / w, decayed)


def group_learning_rates(train: ml_collections.ConfigDict, epoch: jax.Array) -> dict:
  base = epoch_learning_rate(train, epoch)
  return {"new": base, "map_2_id": base, "pretrained": base * train.pretrained_lr_mult}


def apply_generator_update(tx: optax.GradientTransformation, train, params: dict, opt_state,
                           grads: dict, epoch: jax.Array,
                           frozen_labels: tuple[str, ...] = ()) -> tuple[dict, Any]:
  """One Adam step of the generator groups; groups in `frozen_labels` keep their
  parameters and optimizer state (as a PyTorch parameter whose grad is None)."""
  directions, new_opt_state = tx.update(grads, opt_state, params)
  rates = group_learning_rates(train, epoch)
  labels = generator_labels(params)
  new_params = jax.tree.map(
      lambda p, d, lab: p if lab in frozen_labels else p - rates[lab] * d,
      params, directions, labels)
  if frozen_labels:
    inner = dict(new_opt_state.inner_states)
    for lab in frozen_labels:
      inner[lab] = opt_state.inner_states[lab]
    new_opt_state = new_opt_state._replace(inner_states=inner)
  return new_params, new_opt_state


def init_state(config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
  """Fresh state (PyTorch-default init for the new modules, as the recipe starts)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = models.init_variables(config.model, init_rng, GENERATOR_NETS + ("discriminator",))
  params = {n: variables[n]["params"] for n in GENERATOR_NETS}
  disc_params = variables["discriminator"]["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats={n: variables[n]["batch_stats"] for n in BATCH_STAT_NETS},
      opt_state=generator_optimizer(config.train).init(params),
      disc_params=disc_params,
      disc_opt_state=discriminator_optimizer(config.train).init(disc_params),
      rng=jax.random.key_data(state_rng))
