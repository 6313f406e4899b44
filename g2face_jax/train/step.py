"""The pure training iteration of the official recipe: anonymize update, recover
update, discriminator update (R1 every `r1_every` iterations).

`train_step(nets, settings, state, frozen, images)` (nets: `models.Networks` built
with TRAINING_NETWORKS) is a pure function of arrays
(jit it with `sharding.py`'s shardings and donate `state`). Iteration t =
state.step + 1 (1-based, as the official counter) draws all its randomness from
fold_in(state.rng, t) (`draw`), so a resumed run replays the same numbers; a
caller may pass its own `Draws` instead (the parity test feeds the official
iteration's recorded draws through this one seam). The three phases
(`anonymize_phase`, `recover_phase`, `discriminator_phase`) are pure functions
of their parameters, each returning its gradients, so each can be checked alone.

Batch coupling follows the official per-GPU batch (`replica_batch`): BatchNorm
statistics, the identity-diversity pairs and the discriminator's minibatch
stddev are computed within consecutive groups of that many samples, whatever
the device count; the per-group running BatchNorm statistics are averaged
(the official DDP run keeps one copy per GPU and saves rank 0's).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
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


@flax.struct.dataclass
class Draws:
  """Every random number of one iteration (B samples of side S).

  anon_source, rec_source: (B, 512) N(0, 1) values whose float32 bits are the hidden
  bits of the anonymize and recover phases; z: (B, 512) the dummy-identity input;
  anon_noise, rec_noise: the decoder's per-layer noise maps (B, r, r, 1) of the two
  generator calls; input_noise: (B, S, S, 3) added to the generator outputs before
  the extractor in both phases (already scaled by `hiding_input_noise`).
  """
  anon_source: jax.Array
  z: jax.Array
  anon_noise: list
  input_noise: jax.Array
  rec_source: jax.Array
  rec_noise: list


def draw(key: jax.Array, batch: int, size: int, input_noise_std: float) -> Draws:
  """The draws of one iteration from `key` (a typed key)."""
  hide_key, z_key, anon_noise_key, input_noise_key, rec_hide_key, rec_noise_key = (
      jax.random.split(key, 6))
  return Draws(anon_source=jax.random.normal(hide_key, (batch, 512)),
               z=jax.random.normal(z_key, (batch, 512)),
               anon_noise=_decoder_noise(anon_noise_key, size, batch),
               input_noise=input_noise_std * jax.random.normal(input_noise_key,
                                                               (batch, size, size, 3)),
               rec_source=jax.random.normal(rec_hide_key, (batch, 512)),
               rec_noise=_decoder_noise(rec_noise_key, size, batch))


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


def anonymize_phase(nets, settings: Settings, params: dict, batch_stats: dict,
                    disc_params: dict, frozen: dict, x: jax.Array, draws: Draws):
  """The anonymize loss's gradients w.r.t. the generator-side `params` at x (B, S, S, 3).

  Returns (grads, aux): aux holds anon (B, S, S, 3), coeff_anon, arc_x, the hidden bits,
  the BatchNorm statistics after the phase ('stats') and the metrics."""
  w, group = settings.loss, settings.train.replica_batch
  b = x.shape[0]
  coeff_x = jax.lax.stop_gradient(nets.recon_net.apply(frozen["recon_net"], (x + 1) / 2))
  geo_x = jax.lax.stop_gradient(bfm_lib.compute_for_loss(frozen["bfm"], coeff_x))
  hide_bits = payload.float_to_bits(draws.anon_source)

  def loss(params):
    m = {}
    rand_id, m2i_stats = _bn_apply(nets.map_2_id, params["map_2_id"], batch_stats["map_2_id"],
                                   draws.z, group)
    style = nets.style_mapper.apply({"params": params["style_mapper"]}, rand_id,
                                    face3d.geometry_input(coeff_x))
    anon = nets.decoder.apply({"params": params["decoder"]}, x, style, hide_bits,
                              draws.anon_noise)
    # ArcFace of x and anon in one pass: one copy of the network in the compiled program
    arc_both = nets.arcface.apply(frozen["arcface"], jnp.concatenate([x, anon]))
    arc_x, arc_anon = arc_both[:b], arc_both[b:]
    coeff_anon = nets.recon_net.apply(frozen["recon_net"], (anon + 1) / 2)
    geo_anon = bfm_lib.compute_for_loss(frozen["bfm"], coeff_anon)
    diversity = jnp.mean(_grouped(losses.identity_diversity_loss, group, rand_id))
    consistency = losses.cosine_embedding_loss(rand_id, arc_anon, 1)
    change = losses.cosine_embedding_loss(arc_x, arc_anon, -1)
    pixels = _geometry_and_pixels(nets, frozen, settings, anon, x, geo_x, geo_anon, m, "anon")
    gan = losses.generator_gan_loss(_discriminate(nets, disc_params, anon, group))
    logits, ext_stats = _bn_apply(nets.extractor, params["extractor"], batch_stats["extractor"],
                                  anon + draws.input_noise, group)
    hiding = losses.hiding_loss(logits, hide_bits)
    total = (w.diversity * diversity + w.identity * (consistency + change) + pixels
             + w.gan * gan + w.hiding * hiding)
    m.update({"anon/diversity": diversity, "anon/id_consistency": consistency,
              "anon/id_change": change, "anon/gan": gan, "anon/hiding": hiding,
              "anon/total": total, "anon/bit_error_rate": _bit_error_rate(logits, hide_bits)})
    aux = dict(anon=anon, coeff_anon=coeff_anon, arc_x=arc_x, geo_x=geo_x, metrics=m,
               stats={"map_2_id": m2i_stats, "extractor": ext_stats})
    return total, aux

  return jax.grad(loss, has_aux=True)(params)


def recover_phase(nets, settings: Settings, params: dict, batch_stats: dict, disc_params: dict,
                  frozen: dict, x: jax.Array, anonymized: dict, draws: Draws):
  """The recover loss's gradients w.r.t. `params` (after the anonymize update): the real
  identity and the anonymized geometry, new bits, the same input noise. `anonymized`:
  the anonymize phase's aux (anon, coeff_anon, arc_x, geo_x; not differentiated).

  Returns (grads, aux): aux holds rec, the extractor's statistics and the metrics."""
  w, group = settings.loss, settings.train.replica_batch
  anon, coeff_anon, arc_x, geo_x = (jax.lax.stop_gradient(anonymized[k])
                                    for k in ("anon", "coeff_anon", "arc_x", "geo_x"))
  rec_bits = payload.float_to_bits(draws.rec_source)

  def loss(params):
    m = {}
    style = nets.style_mapper.apply({"params": params["style_mapper"]}, arc_x,
                                    face3d.geometry_input(coeff_anon))
    rec = nets.decoder.apply({"params": params["decoder"]}, anon, style, rec_bits,
                             draws.rec_noise)
    arc_rec, _, geo_rec = _face_analysis(nets, frozen, rec)
    same = losses.cosine_embedding_loss(arc_x, arc_rec, 1)
    pixels = _geometry_and_pixels(nets, frozen, settings, rec, x, geo_x, geo_rec, m, "rec")
    gan = losses.generator_gan_loss(_discriminate(nets, disc_params, rec, group))
    logits, ext_stats = _bn_apply(nets.extractor, params["extractor"], batch_stats["extractor"],
                                  rec + draws.input_noise, group)
    hiding = losses.hiding_loss(logits, rec_bits)
    total = w.identity * same + pixels + w.gan * gan + w.hiding * hiding
    m.update({"rec/id_same": same, "rec/gan": gan, "rec/hiding": hiding, "rec/total": total,
              "rec/bit_error_rate": _bit_error_rate(logits, rec_bits)})
    return total, dict(rec=rec, metrics=m, extractor_stats=ext_stats)

  return jax.grad(loss, has_aux=True)(params)


def r1_penalty(nets, disc_params: dict, x: jax.Array, group: int) -> jax.Array:
  """The R1 penalty (unweighted scalar) of the discriminator at real images x (B, S, S, 3),
  the minibatch stddev taken within groups of `group` samples."""
  grad = jax.grad(lambda v: jnp.sum(_discriminate(nets, disc_params, v, group)))(x)
  return losses.r1_penalty(grad)


def discriminator_phase(nets, settings: Settings, disc_params: dict, x: jax.Array,
                        fake: jax.Array, do_r1: jax.Array):
  """The discriminator loss's gradients w.r.t. `disc_params`: real x against `fake`,
  plus the R1 penalty on x when `do_r1`. Returns (grads, metrics)."""
  w, group = settings.loss, settings.train.replica_batch
  b = x.shape[0]

  def loss(disc_params):
    logits = _discriminate(nets, disc_params, jnp.concatenate([x, fake]), group)
    real_loss, fake_loss = losses.discriminator_gan_losses(logits[:b], logits[b:])

    penalty = jax.lax.cond(do_r1, lambda dp: r1_penalty(nets, dp, x, group),
                           lambda dp: jnp.zeros((), jnp.float32), disc_params)
    total = real_loss + fake_loss + w.r1 * penalty
    return total, {"disc/real": real_loss, "disc/fake": fake_loss, "disc/r1": penalty,
                   "disc/total": total}

  return jax.grad(loss, has_aux=True)(disc_params)


def train_step(nets: models.Networks, settings: Settings, state: state_lib.TrainState,
               frozen: dict, images: jax.Array,
               draws: Draws | None = None) -> tuple[state_lib.TrainState, dict]:
  """One official iteration on images (B, S, S, 3) in [-1, 1]: anonymize update, recover
  update (on the updated weights), discriminator update. `draws`: the iteration's random
  numbers (default: `draw` from fold_in(state.rng, t)). Returns (new state, metrics)."""
  tr = settings.train
  b, size = images.shape[0], images.shape[1]
  t = state.step + 1
  epoch = (t - 1) // settings.steps_per_epoch + 1
  in_epoch_index = (t - 1) % settings.steps_per_epoch
  if draws is None:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), t)
    draws = draw(key, b, size, tr.hiding_input_noise)
  tx = state_lib.generator_optimizer(tr)
  x = images.astype(jnp.float32)

  # (1) anonymize update
  grads, anonymized = anonymize_phase(nets, settings, state.params, state.batch_stats,
                                      state.disc_params, frozen, x, draws)
  params, opt_state = state_lib.apply_generator_update(tx, tr, state.params, state.opt_state,
                                                       grads, epoch)
  batch_stats = anonymized["stats"]
  metrics = dict(anonymized["metrics"])

  # (2) recover update (map_2_id is not in its graph: no step, as PyTorch with grad None)
  grads, recovered = recover_phase(nets, settings, params, batch_stats, state.disc_params,
                                   frozen, x, anonymized, draws)
  params, opt_state = state_lib.apply_generator_update(tx, tr, params, opt_state, grads, epoch,
                                                       frozen_labels=("map_2_id",))
  batch_stats = {**batch_stats, "extractor": recovered["extractor_stats"]}
  metrics.update(recovered["metrics"])

  # (3) discriminator update: fake = recovered on even in-epoch indices, else anonymized
  anon, rec = (jax.lax.stop_gradient(a) for a in (anonymized["anon"], recovered["rec"]))
  fake = jnp.where(in_epoch_index % 2 == 0, rec, anon)
  grads, m = discriminator_phase(nets, settings, state.disc_params, x, fake,
                                 (t % tr.r1_every) == 0)
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
