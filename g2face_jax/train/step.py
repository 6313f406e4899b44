"""The pure training iteration of the official recipe: anonymize update, recover
update, discriminator update (R1 every `r1_every` iterations).

`train_step(nets, settings, state, frozen, images)` (nets: `models.Networks` built
with TRAINING_NETWORKS) is a pure function of arrays
(jit it with `sharding.py`'s shardings and donate `state`). Iteration t =
state.step + 1 (1-based, as the official counter) draws all its randomness from
fold_in(state.rng, t), so a resumed run replays the same numbers.

Batch coupling follows the official per-GPU batch (`replica_batch`): BatchNorm
statistics, the identity-diversity pairs and the discriminator's minibatch
stddev are computed within consecutive groups of that many samples, whatever
the device count; the per-group running BatchNorm statistics are averaged
(the official DDP run keeps one copy per GPU and saves rank 0's).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from g2face_jax import models, payload
from g2face_jax.nn import bfm as bfm_lib
from g2face_jax.nn import decoder as decoder_lib
from g2face_jax.nn import face3d
from g2face_jax.train import losses
from g2face_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """Static numbers of the step, read once from the config."""
  train: ml_collections.FrozenConfigDict
  loss: ml_collections.FrozenConfigDict
  steps_per_epoch: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, steps_per_epoch: int) -> "Settings":
    if steps_per_epoch < 1:
      raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return cls(ml_collections.FrozenConfigDict(config.train),
               ml_collections.FrozenConfigDict(config.loss), steps_per_epoch)


def _grouped(fn: Callable, group: int, *arrays):
  """Apply fn to consecutive groups of `group` samples (vmapped); outputs get the
  batch back for arrays whose leading axis is the group, others keep the group axis."""
  b = arrays[0].shape[0]
  if b % group:
    raise ValueError(f"batch {b} is not a multiple of replica_batch {group}")
  split = [a.reshape((b // group, group) + a.shape[1:]) for a in arrays]
  return jax.vmap(fn)(*split)


def _ungroup(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


def _bn_apply(module, params, stats, x, group, **kwargs):
  """Train-mode BatchNorm network on groups -> (output (B, ...), averaged new stats)."""
  def one(xg):
    out, upd = module.apply({"params": params, "batch_stats": stats}, xg, train=True,
                            mutable=["batch_stats"], **kwargs)
    return out, upd["batch_stats"]
  out, new_stats = _grouped(one, group, x)
  return _ungroup(out), jax.tree.map(lambda s: jnp.mean(s, axis=0), new_stats)


def _discriminate(nets, disc_params, x, group):
  """D logits (B, 1) with the minibatch stddev taken within each replica group."""
  return _ungroup(_grouped(lambda xg: nets.discriminator.apply({"params": disc_params}, xg),
                           group, x))


def _decoder_noise(key, size, batch):
  shapes = decoder_lib.noise_shapes(size, batch)
  return [jax.random.normal(k, s, jnp.float32) for k, s in zip(jax.random.split(key, len(shapes)), shapes)]


def _face_analysis(nets, frozen, image):
  """ArcFace identity (B,512), 3DMM coefficients (B,257) and the loss geometry of image."""
  identity = nets.arcface.apply(frozen["arcface"], image)
  coeff = nets.recon_net.apply(frozen["recon_net"], (image + 1) / 2)
  return identity, coeff, bfm_lib.compute_for_loss(frozen["bfm"], coeff)


def _geometry_and_pixels(nets, frozen, settings, out, x, geo_x, geo_out, metrics, prefix):
  """Weighted geometry + L1 + LPIPS of `out` against x; fills metrics."""
  w = settings.loss
  geo = losses.geometry_losses(geo_x, geo_out)
  l1 = losses.l1_loss(out, x)
  lp = jnp.mean(nets.lpips.apply(frozen["lpips"], out, x))
  metrics.update({f"{prefix}/{k}": v for k, v in geo.items()})
  metrics.update({f"{prefix}/l1": l1, f"{prefix}/lpips": lp})
  return (w.shape * geo["shape"] + w.landmark * geo["landmark"] + w.color * geo["color"]
          + w.l1 * l1 + w.lpips * lp)


def _bit_error_rate(logits, bits):
  return jnp.mean((payload.bits_from_logits(logits) != bits).astype(jnp.float32))


def train_step(nets: models.Networks, settings: Settings, state: state_lib.TrainState,
               frozen: dict, images: jax.Array) -> tuple[state_lib.TrainState, dict]:
  """One official iteration on images (B, S, S, 3) in [-1, 1]. Returns (new state, metrics)."""
  tr, w = settings.train, settings.loss
  group = tr.replica_batch
  b, size = images.shape[0], images.shape[1]
  t = state.step + 1
  epoch = (t - 1) // settings.steps_per_epoch + 1
  in_epoch_index = (t - 1) % settings.steps_per_epoch
  keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state.rng), t), 6)
  hide_key, z_key, anon_noise_key, input_noise_key, rec_hide_key, rec_noise_key = keys
  tx = state_lib.generator_optimizer(tr)
  x = images.astype(jnp.float32)
  metrics = {}

  coeff_x = jax.lax.stop_gradient(nets.recon_net.apply(frozen["recon_net"], (x + 1) / 2))
  geo_x = jax.lax.stop_gradient(bfm_lib.compute_for_loss(frozen["bfm"], coeff_x))
  hide_bits = payload.float_to_bits(jax.random.normal(hide_key, (b, 512)))
  z = jax.random.normal(z_key, (b, 512))
  input_noise = tr.hiding_input_noise * jax.random.normal(input_noise_key, x.shape)

  # (1) anonymize update
  def anonymize_loss(params):
    m = {}
    rand_id, m2i_stats = _bn_apply(nets.map_2_id, params["map_2_id"],
                                   state.batch_stats["map_2_id"], z, group)
    style = nets.style_mapper.apply({"params": params["style_mapper"]}, rand_id,
                                    face3d.geometry_input(coeff_x))
    anon = nets.decoder.apply({"params": params["decoder"]}, x, style, hide_bits,
                              _decoder_noise(anon_noise_key, size, b))
    # ArcFace of x and anon in one pass: one copy of the network in the compiled program
    arc_both = nets.arcface.apply(frozen["arcface"], jnp.concatenate([x, anon]))
    arc_x, arc_anon = arc_both[:b], arc_both[b:]
    coeff_anon = nets.recon_net.apply(frozen["recon_net"], (anon + 1) / 2)
    geo_anon = bfm_lib.compute_for_loss(frozen["bfm"], coeff_anon)
    diversity = jnp.mean(_grouped(losses.identity_diversity_loss, group, rand_id))
    consistency = losses.cosine_embedding_loss(rand_id, arc_anon, 1)
    change = losses.cosine_embedding_loss(arc_x, arc_anon, -1)
    pixels = _geometry_and_pixels(nets, frozen, settings, anon, x, geo_x, geo_anon, m, "anon")
    gan = losses.generator_gan_loss(_discriminate(nets, state.disc_params, anon, group))
    logits, ext_stats = _bn_apply(nets.extractor, params["extractor"],
                                  state.batch_stats["extractor"], anon + input_noise, group)
    hiding = losses.hiding_loss(logits, hide_bits)
    total = (w.diversity * diversity + w.identity * (consistency + change) + pixels
             + w.gan * gan + w.hiding * hiding)
    m.update({"anon/diversity": diversity, "anon/id_consistency": consistency,
              "anon/id_change": change, "anon/gan": gan, "anon/hiding": hiding,
              "anon/total": total, "anon/bit_error_rate": _bit_error_rate(logits, hide_bits)})
    aux = dict(anon=anon, coeff_anon=coeff_anon, arc_x=arc_x, metrics=m,
               stats={"map_2_id": m2i_stats, "extractor": ext_stats})
    return total, aux

  grads, aux = jax.grad(anonymize_loss, has_aux=True)(state.params)
  params, opt_state = state_lib.apply_generator_update(tx, tr, state.params, state.opt_state,
                                                       grads, epoch)
  batch_stats = aux["stats"]
  metrics.update(aux["metrics"])
  anon = jax.lax.stop_gradient(aux["anon"])
  coeff_anon = jax.lax.stop_gradient(aux["coeff_anon"])
  arc_x = jax.lax.stop_gradient(aux["arc_x"])

  # (2) recover update: the real identity and the anon's geometry, new bits, same input noise
  rec_bits = payload.float_to_bits(jax.random.normal(rec_hide_key, (b, 512)))

  def recover_loss(params):
    m = {}
    style = nets.style_mapper.apply({"params": params["style_mapper"]}, arc_x,
                                    face3d.geometry_input(coeff_anon))
    rec = nets.decoder.apply({"params": params["decoder"]}, anon, style, rec_bits,
                             _decoder_noise(rec_noise_key, size, b))
    arc_rec, _, geo_rec = _face_analysis(nets, frozen, rec)
    same = losses.cosine_embedding_loss(arc_x, arc_rec, 1)
    pixels = _geometry_and_pixels(nets, frozen, settings, rec, x, geo_x, geo_rec, m, "rec")
    gan = losses.generator_gan_loss(_discriminate(nets, state.disc_params, rec, group))
    logits, ext_stats = _bn_apply(nets.extractor, params["extractor"],
                                  batch_stats["extractor"], rec + input_noise, group)
    hiding = losses.hiding_loss(logits, rec_bits)
    total = w.identity * same + pixels + w.gan * gan + w.hiding * hiding
    m.update({"rec/id_same": same, "rec/gan": gan, "rec/hiding": hiding, "rec/total": total,
              "rec/bit_error_rate": _bit_error_rate(logits, rec_bits)})
    return total, dict(rec=rec, metrics=m, extractor_stats=ext_stats)

  grads, aux = jax.grad(recover_loss, has_aux=True)(params)
  params, opt_state = state_lib.apply_generator_update(tx, tr, params, opt_state, grads, epoch,
                                                       frozen_labels=("map_2_id",))
  batch_stats = {**batch_stats, "extractor": aux["extractor_stats"]}
  metrics.update(aux["metrics"])
  rec = jax.lax.stop_gradient(aux["rec"])

  # (3) discriminator update: fake = recovered on even in-epoch indices, else anonymized
  fake = jnp.where(in_epoch_index % 2 == 0, rec, anon)
  do_r1 = (t % tr.r1_every) == 0

  def disc_loss(disc_params):
    logits = _discriminate(nets, disc_params, jnp.concatenate([x, fake]), group)
    real_loss, fake_loss = losses.discriminator_gan_losses(logits[:b], logits[b:])

    def r1(dp):
      grad = jax.grad(lambda v: jnp.sum(_discriminate(nets, dp, v, group)))(x)
      return losses.r1_penalty(grad)

    penalty = jax.lax.cond(do_r1, r1, lambda dp: jnp.zeros((), jnp.float32), disc_params)
    total = real_loss + fake_loss + w.r1 * penalty
    return total, {"disc/real": real_loss, "disc/fake": fake_loss, "disc/r1": penalty,
                   "disc/total": total}

  grads, m = jax.grad(disc_loss, has_aux=True)(state.disc_params)
  updates, disc_opt_state = state_lib.discriminator_optimizer(tr).update(
      grads, state.disc_opt_state, state.disc_params)
  disc_params = jax.tree.map(lambda p, u: p + u, state.disc_params, updates)
  metrics.update(m)
  metrics["lr"] = state_lib.epoch_learning_rate(tr, epoch)

  new_state = state.replace(step=t, params=params, batch_stats=batch_stats, opt_state=opt_state,
                            disc_params=disc_params, disc_opt_state=disc_opt_state)
  return new_state, metrics


def sample_step(nets: models.Networks, state: state_lib.TrainState, frozen: dict,
                images: jax.Array, rng: jax.Array) -> dict:
  """Inference-mode anonymize + recover of images, as the official test: hidden bits =
  the image's ArcFace identity, eval-mode BatchNorm. Returns anon, recovered (unclipped),
  bit_error_rate and recovery l1 (scalars)."""
  p, stats = state.params, state.batch_stats
  b, size = images.shape[0], images.shape[1]
  z_key, n1, n2 = jax.random.split(rng, 3)
  arc_x, coeff_x, _ = _face_analysis(nets, frozen, images)
  bits = payload.float_to_bits(arc_x)
  rand_id = nets.map_2_id.apply({"params": p["map_2_id"], "batch_stats": stats["map_2_id"]},
                                jax.random.normal(z_key, (b, 512)), train=False)
  style = nets.style_mapper.apply({"params": p["style_mapper"]}, rand_id,
                                  face3d.geometry_input(coeff_x))
  anon = nets.decoder.apply({"params": p["decoder"]}, images, style, bits,
                            _decoder_noise(n1, size, b))
  logits = nets.extractor.apply({"params": p["extractor"], "batch_stats": stats["extractor"]},
                                anon, train=False)
  extracted = payload.decode_identity(payload.bits_from_logits(logits))
  coeff_anon = nets.recon_net.apply(frozen["recon_net"], (anon + 1) / 2)
  style = nets.style_mapper.apply({"params": p["style_mapper"]}, extracted,
                                  face3d.geometry_input(coeff_anon))
  rec = nets.decoder.apply({"params": p["decoder"]}, anon, style, bits,
                           _decoder_noise(n2, size, b))
  return dict(anon=anon, recovered=rec, bit_error_rate=_bit_error_rate(logits, bits),
              recovery_l1=losses.l1_loss(rec, images))
