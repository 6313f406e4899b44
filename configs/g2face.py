"""G2Face configurations: `get_config("paper")` is the official 256 model.

Variants (pick with `configs/g2face.py:VARIANT[,key=value...]`):
  paper  official 256x256 G2Face (rosinality config-f widths, 512-d styles)
  smoke  64x64, narrow: a quick end-to-end run on CPU
  tiny   32x32, very narrow: unit tests and notebooks in CI
Overrides after the variant set top-level-or-dotted fields, e.g.
`configs/g2face.py:paper,model.size=128` or `smoke,train.num_steps=50`.

Training sections (read by `g2face_jax.train`): `train` (optimizer, schedule,
batch), `loss` (weights of the official recipe), `data`, `pretrained` (the bundle
of converted networks a run starts from; empty = random initialisation),
`checkpoint`, `log` and `mesh`.
The paper values are the official recipe (see the "Training recipe" spec).
"""
from __future__ import annotations

import ml_collections

PAPER_CHANNELS = (512, 512, 512, 512, 512, 256, 128)  # resolutions 4 .. 256


def _model(size: int, channels: tuple[int, ...], style_dim: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      size=size,                 # output (and input) resolution
      channels=channels,         # decoder/discriminator width at 4, 8, ..., size
      style_dim=style_dim,       # width of each style vector
      blur_taps=(1, 3, 3, 1),    # StyleGAN2 FIR filter
      identity_dim=512,          # ArcFace embedding = 512 float32 hidden values
      geometry_dim=147,          # 3DMM id 80 + exp 64 + angles 3
      mapper_layers=4,           # equalized linears per style-mapper head
      arcface_layers=(3, 4, 14, 3),  # iresnet50; (3, 13, 30, 3) for iresnet100
      recon_layers=(3, 4, 6, 3),     # Deep3DFaceRecon's ResNet-50 trunk
  ))


def _training(global_batch: int, replica_batch: int, num_steps: int) -> dict:
  """Training sections with the official recipe's values; the variants set the sizes."""
  return dict(
      train=ml_collections.ConfigDict(dict(
          seed=2024,                    # official default seed
          global_batch=global_batch,    # paper: 8 per GPU x 4 GPUs
          # Official per-GPU batch: BatchNorm statistics (map_2_id, extractor), the
          # identity-diversity pairs and the discriminator's minibatch-stddev groups are
          # computed within groups of this many samples, as on each official GPU.
          replica_batch=replica_batch,
          num_steps=num_steps,          # iterations (each: anonymize, recover, discriminator)
          steps_per_epoch=0,            # 0: len(dataset) // global_batch (drop-last epochs)
          lr=1e-3,                      # new modules, style mapper, map_2_id, extractor
          pretrained_lr_mult=0.1,       # StyleGAN2 synthesis layers of the decoder
          disc_lr=1e-3,                 # discriminator, constant
          adam_b1=0.0,
          adam_b2=0.999,
          adam_eps=1e-8,
          warmup_epochs=10,             # lr * e / warmup over epochs 1..warmup, then lr
          decay_per_epoch=0.95,         # x0.95 per epoch after warmup + 1
          r1_every=16,                  # R1 on iterations that are multiples of this
          hiding_input_noise=0.01,      # std of N(0, s^2) added before the extractor
          # Rematerialisation of every network in the backward pass (memory for compute):
          # none (official), full, dots_saveable, dots_with_no_batch_dims_saveable.
          remat="none",
          # Network compute dtype; state, losses and optimizer stay float32: float32
          # (official) or bfloat16 (for accelerators).
          compute_dtype="float32",
      )),
      loss=ml_collections.ConfigDict(dict(
          identity=1.0, diversity=1.0, shape=1.0, landmark=0.01, color=1.0,
          l1=1.0, lpips=1.0, gan=1.0, hiding=10.0, r1=5.0,
      )),
      data=ml_collections.ConfigDict(dict(
          # 'demo' (bundled LFW face crops from scikit-image), an image folder,
          # 'arrayrecord:GLOB' (written by `g2face prepare-data`) or 'tfds:NAME[:SPLIT]'.
          source="demo",
          # The demo set is for trying the code: the paper config refuses it unless this
          # is True (smoke and tiny set it).
          allow_demo=False,
          flip=True,                    # random horizontal flip
          shuffle_seed=0,
          # Threads decoding and resizing records; -1 (auto, pipeline.auto_workers): none on
          # 1 or 2 cores (XLA's step needs them; the prefetch thread alone keeps up there,
          # docs/benchmarks.md), else half the cores this process may use, at most 16.
          # The record order and the saved position do not depend on it.
          workers=-1,
          prefetch=2,                   # batches assembled ahead in a background thread (0: none)
      )),
      pretrained=ml_collections.ConfigDict(dict(
          # A bundle folder written by `g2face convert` (--stylegan --arcface --d3dfr
          # --lpips-vgg16 --lpips-heads --bfm) for this config's model. Empty: random
          # stand-ins for ArcFace, the 3DMM regressor and LPIPS, a small synthetic BFM and
          # a fresh decoder (smoke and test runs: identity and geometry then mean nothing).
          bundle="",
          # With a bundle: start the generator from its decoder (the StyleGAN2 synthesis
          # layers of `--stylegan`, or a whole G2Face model of `--g2face` / `g2face
          # export`); False: a fresh generator, only the frozen networks and BFM read.
          start=True,
          # Without a bundle: random stand-ins for ArcFace, the 3DMM regressor and LPIPS, a
          # synthetic BFM and a fresh decoder. False (paper): refuse to start, naming the
          # missing files; smoke and tiny set True (identity and geometry then mean nothing).
          allow_random=False,
      )),
      checkpoint=ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True)),
      log=ml_collections.ConfigDict(dict(
          # Metrics stay on the devices between logs: every `every_steps` iterations (and
          # before each checkpoint) they are fetched at once, checked for NaN/inf (the run
          # stops naming the step) and their means logged with steps/s over the interval.
          every_steps=10,
          sample_every_steps=500,       # sample grid PNGs (0: only before and after)
          samples=4,                    # faces in each grid
          # > 0: a jax.profiler trace of this many iterations after the first (compiled)
          # one, written under WORKDIR/profile (TensorBoard's profile tab or XProf).
          profile_steps=0,
          # jax.transfer_guard over the iterations after the first: 'log' reports and
          # 'disallow' refuses every implicit host<->device transfer ('allow': off).
          transfer_guard="allow",
      )),
      mesh=ml_collections.ConfigDict(dict(
          data=-1,          # -1: all devices not used by fsdp
          fsdp=1,           # parameter (and batch) sharding axis
          # logical axis -> mesh axes: the batch over both axes, parameters over fsdp
          axis_rules=(("batch", ("data", "fsdp")), ("params", "fsdp")),
          fsdp_min_size=2 ** 12,  # parameters with fewer elements stay replicated
      )),
  )


def _variant(name: str) -> ml_collections.ConfigDict:
  if name == "paper":
    model = _model(256, PAPER_CHANNELS, 512)
    training = _training(global_batch=32, replica_batch=8, num_steps=100_000)
  elif name == "smoke":
    model = _model(64, (64, 64, 64, 32, 16), 64)
    # shallow random ArcFace and 3DMM regressor: CPU-sized (no weights to load)
    model.arcface_layers = model.recon_layers = (1, 1, 1, 1)
    training = _training(global_batch=4, replica_batch=4, num_steps=80)
    # A few minutes on CPU: the demo set has 25 steps per epoch, so the official 10-epoch
    # warm-up would cover the whole run; the smoke run warms up over its first epoch.
    training["train"].warmup_epochs = 1
    # The small decoder learns to hide its 16384 bits only with a stronger push: at the
    # recipe's lr 1e-3 and hiding weight 10 the training batches' bit error rate stays at
    # the N(0, 1) bit prior (~0.41) through 80 iterations; with these it falls below the
    # prior after about 130 iterations (README, Limitations).
    training["train"].lr = 3e-3
    training["loss"].hiding = 100.0
    training["log"].sample_every_steps = 40
  elif name == "tiny":
    model = _model(32, (32, 32, 16, 16), 32)
    model.arcface_layers = model.recon_layers = (1, 1, 1, 1)
    training = _training(global_batch=4, replica_batch=2, num_steps=2)
  else:
    raise ValueError(f"unknown config variant '{name}' (paper, smoke, tiny)")
  if name != "paper":  # CPU-sized runs: random frozen networks and the demo faces are fine
    training["pretrained"].allow_random = True
    training["data"].allow_demo = True
  return ml_collections.ConfigDict(dict(variant=name, model=model, **training))


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  return text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: 'VARIANT[,key=value,...]' (default 'paper'). Returns a locked config."""
  parts = [p for p in (arg or "paper").split(",") if p]
  config = _variant(parts[0])
  for part in parts[1:]:
    if "=" not in part:
      raise ValueError(f"config override '{part}' must be key=value")
    key, value = part.split("=", 1)
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"config has no field '{key}'")
    node[leaf] = _parse_value(value)
  config.lock()
  return config
