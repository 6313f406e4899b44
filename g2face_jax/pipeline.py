"""Anonymize and recover aligned face crops: the stages of the official test, jitted.

Crops are (B, size, size, 3) float32 in [-1, 1]. `variables` maps a network
name ('decoder', 'style_mapper', 'map_2_id', 'extractor', 'arcface',
'recon_net') to its Flax variables. The anonymized image is not clipped
here: the official code clips it only when writing a file.

Stages (the parity fixtures' README):
  analyze:    arc_id = ArcFace(x); coeff = D3DFR((x+1)/2)
  anonymize:  rand_id = Map2ID(z) (eval); style = Mapper(rand_id, geometry(coeff));
              anon = Decoder(x, style, hide_bits, noise)
  extract:    logits = Extractor(anon) (eval); bits = round(sigmoid(logits));
              extracted_id = official decode of bits
  restore:    coeff_anon = D3DFR((anon+1)/2);
              recovered = Decoder(anon, Mapper(identity, geometry(coeff_anon)), hide_bits, noise)
The hidden bits are an input, so any payload code can ride on the decoder;
`official_anonymize` / `official_recover` chain the stages with the official
float32 code (hide_bits = the 32 IEEE bits of each ArcFace value).

`dtype` (anonymize, extract_identity, restore and the official chains):
'float32' (default) is the official computation; 'bfloat16' runs the decoder's
and the extractor's heavy convolutions on bfloat16 operands with float32
accumulation (see `decoder.Decoder`), a faster approximation where the CPU has
bfloat16 matmul units. Variables, inputs and outputs stay float32 either way;
`analyze` (ArcFace, 3DMM) and the small mapping networks always run in float32.

Every stage computes its float32 matmuls and convolutions in full float32
(JAX's 'highest' precision): JAX's default lets GPUs round their operands to
TF32 (10-bit mantissa) and TPUs to bfloat16, which moves the outputs far beyond
the official code's. A caller that sets `jax.default_matmul_precision` (or the
`jax_default_matmul_precision` option) gets its own choice instead, e.g.
'tensorfloat32' for speed on GPUs.

`micro_batch` (every stage): samples per step of a loop over the batch inside
the jitted program (`jax.lax.map`). Every network runs per sample at test time
(evaluation-mode BatchNorm, per-sample InstanceNorm), so the results do not
depend on it (beyond float32 rounding). None means the whole batch on
accelerators, and on CPU one face per step for the decoder and the extractor
(whose large maps gain nothing from sharing a step) but up to
`SMALL_NETS_CPU_FACES` for ArcFace and
the 3DMM regressor, whose small maps gain from sharing each weight read (see
there); a value at least the batch size runs it in one step.

Several devices (GPUs of one host, or the CPU split by `tools.cpu_devices.split`)
share a batch they divide: each runs its share (`data_parallel_devices`,
`jax.shard_map`), looping over it per `micro_batch`. A mesh set by the caller
(`jax.set_mesh`, inside `shard_map`) turns this off.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax

from g2face_jax import models, payload
from g2face_jax.nn import face3d

Variables = Mapping[str, Mapping]


DTYPES = ("float32", "bfloat16")


def in_dtype(nets: models.Networks, dtype: str) -> models.Networks:
  """`nets` with the decoder and extractor computing in `dtype` (one of DTYPES);
  'float32' returns `nets` itself."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown compute dtype {dtype!r} (choose from {', '.join(DTYPES)})")
  if dtype == "float32":
    return nets
  return dataclasses.replace(nets, decoder=nets.decoder.clone(dtype=dtype),
                             extractor=nets.extractor.clone(dtype=dtype))


def float32_matmuls(fn):
  """`fn` traced at 'highest' matmul/conv precision unless the caller has set one
  (every stage here; wrap any other jitted function that computes official outputs)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    if jax.config.jax_default_matmul_precision is not None:
      return fn(*args, **kwargs)
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)
  return traced


# ArcFace (112x112 in) and the 3DMM regressor (224x224 in) run on small maps,
# where faces that share a step share each weight read (docs/benchmarks.md).
SMALL_NETS_CPU_FACES = 4


def default_micro_batch(cpu_faces: int = 1) -> int | None:
  """`cpu_faces` on CPU, None (the whole batch in one step) on accelerators."""
  return cpu_faces if jax.default_backend() == "cpu" else None


def faces_per_step(micro_batch: int | None, batch: int, cpu_faces: int = 1) -> int:
  """Faces per step of the loop over a batch of `batch`: `micro_batch` capped at
  the batch; when None, the whole batch on accelerators and on CPU the largest
  divisor of the batch up to `cpu_faces`.

  A ValueError if `micro_batch` is below 1 or does not divide the batch.
  """
  if micro_batch is None:
    m = default_micro_batch(cpu_faces)
    return batch if m is None else max(d for d in range(1, min(m, batch) + 1) if batch % d == 0)
  if micro_batch < 1:
    raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
  m = min(micro_batch, batch)
  if batch % m:
    raise ValueError(f"batch {batch} is not a multiple of micro_batch {m}")
  return m


def data_parallel_devices(batch: int) -> int:
  """How many devices share a batch of `batch`: all of this process's devices when
  there are several, they divide the batch, there is one process and the caller
  set no mesh of its own (`jax.set_mesh`, `shard_map`); else 1."""
  n = jax.device_count()
  own_mesh = jax.process_count() == 1 and jax.sharding.get_abstract_mesh().empty
  return n if n > 1 and batch % n == 0 and own_mesh else 1


def _loop(fn, micro_batch: int | None, *args, cpu_faces: int = 1):
  """fn(*args) with every arg batched on axis 0, run `faces_per_step` samples at a
  time: one call when that is the whole batch, else a `lax.map` loop over the
  chunks with the outputs joined."""
  b = jax.tree.leaves(args)[0].shape[0]
  m = faces_per_step(micro_batch, b, cpu_faces)
  if m >= b:
    return fn(*args)
  chunks = jax.tree.map(lambda a: a.reshape((b // m, m) + a.shape[1:]), args)
  out = jax.lax.map(lambda c: fn(*c), chunks)
  return jax.tree.map(lambda a: a.reshape((b,) + a.shape[2:]), out)


def _per_sample(fn, micro_batch: int | None, *args, cpu_faces: int = 1):
  """`_loop(fn, micro_batch, *args, cpu_faces=cpu_faces)`, the batch split over
  `data_parallel_devices` (each device loops over its share)."""
  loop = functools.partial(_loop, fn, micro_batch, cpu_faces=cpu_faces)
  n = data_parallel_devices(jax.tree.leaves(args)[0].shape[0])
  if n == 1:
    return loop(*args)
  mesh = jax.sharding.Mesh(jax.devices(), ("batch",))
  batch = jax.sharding.PartitionSpec("batch")
  return jax.shard_map(loop, mesh=mesh, in_specs=batch, out_specs=batch)(*args)


def _coefficients(nets: models.Networks, variables: Variables, x: jax.Array) -> jax.Array:
  """x (B,S,S,3) in [-1,1] -> (B,257) 3DMM coefficients."""
  return nets.recon_net.apply(variables["recon_net"], (x + 1) / 2)


def _styles(nets: models.Networks, variables: Variables, identity: jax.Array,
            coeff: jax.Array) -> jax.Array:
  return nets.style_mapper.apply(variables["style_mapper"], identity,
                                 face3d.geometry_input(coeff))


@functools.partial(jax.jit, static_argnums=0, static_argnames="micro_batch")
@float32_matmuls
def analyze(nets: models.Networks, variables: Variables, x: jax.Array,
            micro_batch: int | None = None) -> dict[str, jax.Array]:
  """x (B,S,S,3) in [-1,1] -> arc_id (B,512) ArcFace identity, coeff (B,257) 3DMM coefficients."""
  def body(x):
    return dict(arc_id=nets.arcface.apply(variables["arcface"], x),
                coeff=_coefficients(nets, variables, x))
  return _per_sample(body, micro_batch, x, cpu_faces=SMALL_NETS_CPU_FACES)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("dtype", "micro_batch"))
@float32_matmuls
def anonymize(nets: models.Networks, variables: Variables, x: jax.Array, coeff: jax.Array,
              z: jax.Array, hide_bits: jax.Array, noise: Sequence[jax.Array],
              dtype: str = "float32", micro_batch: int | None = None) -> dict[str, jax.Array]:
  """Decode x towards the virtual identity Map2ID(z) with the bits hidden in it.

  x (B,S,S,3) in [-1,1]; coeff (B,257) from `analyze`; z (B,512) dummy-identity
  input; hide_bits (B,512,32) in {0,1}; noise per `decoder.noise_shapes`.
  Returns rand_id (B,512), style (B,n_styles,style_dim) and anon (B,S,S,3), unclipped.
  """
  nets = in_dtype(nets, dtype)

  def body(x, coeff, z, hide_bits, noise):
    rand_id = nets.map_2_id.apply(variables["map_2_id"], z, train=False)
    style = _styles(nets, variables, rand_id, coeff)
    anon = nets.decoder.apply(variables["decoder"], x, style, hide_bits, noise)
    return dict(rand_id=rand_id, style=style, anon=anon)
  return _per_sample(body, micro_batch, x, coeff, z, hide_bits, list(noise))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("dtype", "micro_batch"))
@float32_matmuls
def extract_identity(nets: models.Networks, variables: Variables, anon: jax.Array,
                     dtype: str = "float32",
                     micro_batch: int | None = None) -> dict[str, jax.Array]:
  """anon (B,S,S,3) -> logits (B,512,32), bits in {0,1} and the officially decoded identity (B,512)."""
  nets = in_dtype(nets, dtype)
  logits = _per_sample(lambda a: nets.extractor.apply(variables["extractor"], a, train=False),
                       micro_batch, anon)
  bits = payload.bits_from_logits(logits)
  return dict(logits=logits, bits=bits, extracted_id=payload.decode_identity(bits))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("dtype", "micro_batch"))
@float32_matmuls
def restore(nets: models.Networks, variables: Variables, anon: jax.Array, identity: jax.Array,
            hide_bits: jax.Array, noise: Sequence[jax.Array], dtype: str = "float32",
            micro_batch: int | None = None) -> dict[str, jax.Array]:
  """Decoder pass back to `identity` (B,512): coeff_anon (B,257) and recovered (B,S,S,3)."""
  nets = in_dtype(nets, dtype)

  coeff_anon = _per_sample(functools.partial(_coefficients, nets, variables), micro_batch, anon,
                           cpu_faces=SMALL_NETS_CPU_FACES)

  def body(anon, identity, coeff_anon, hide_bits, noise):
    style = _styles(nets, variables, identity, coeff_anon)
    return nets.decoder.apply(variables["decoder"], anon, style, hide_bits, noise)
  recovered = _per_sample(body, micro_batch, anon, identity, coeff_anon, hide_bits, list(noise))
  return dict(coeff_anon=coeff_anon, recovered=recovered)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("dtype", "micro_batch"))
@float32_matmuls
def official_anonymize(nets: models.Networks, variables: Variables, x: jax.Array, z: jax.Array,
                       noise: Sequence[jax.Array], dtype: str = "float32",
                       micro_batch: int | None = None) -> dict[str, jax.Array]:
  """The official test's anonymization, one jitted program: hides the float32 bits of ArcFace(x).

  Returns arc_id, coeff, hide_bits and what `anonymize` returns.
  """
  out = analyze(nets, variables, x, micro_batch=micro_batch)
  out["hide_bits"] = payload.float_to_bits(out["arc_id"])
  out.update(anonymize(nets, variables, x, out["coeff"], z, out["hide_bits"], noise, dtype=dtype,
                       micro_batch=micro_batch))
  return out


@functools.partial(jax.jit, static_argnums=0, static_argnames=("dtype", "micro_batch"))
@float32_matmuls
def official_recover(nets: models.Networks, variables: Variables, anon: jax.Array,
                     hide_bits: jax.Array, noise: Sequence[jax.Array], dtype: str = "float32",
                     micro_batch: int | None = None) -> dict[str, jax.Array]:
  """The official test's recovery, one jitted program: extract the hidden identity from
  anon and decode back.

  hide_bits (B,512,32) is what the recovery pass hides again (the official test
  passes the original's bits). Returns what `extract_identity` and `restore` return.
  """
  out = extract_identity(nets, variables, anon, dtype=dtype, micro_batch=micro_batch)
  out.update(restore(nets, variables, anon, out["extracted_id"], hide_bits, noise, dtype=dtype,
                     micro_batch=micro_batch))
  return out


class Stages:
  """The stages bound to one set of networks and variables, with `dtype` and
  `micro_batch` fixed for all of them: same arguments and results as the module's
  functions of the same names, less `nets` and `variables`."""

  def __init__(self, nets: models.Networks, variables: Variables, *, dtype: str = "float32",
               micro_batch: int | None = None):
    self.nets, self.variables = nets, variables
    self._typed = dict(dtype=dtype, micro_batch=micro_batch)

  def analyze(self, x: jax.Array) -> dict[str, jax.Array]:
    return analyze(self.nets, self.variables, x, micro_batch=self._typed["micro_batch"])

  def anonymize(self, x, coeff, z, hide_bits, noise) -> dict[str, jax.Array]:
    return anonymize(self.nets, self.variables, x, coeff, z, hide_bits, list(noise), **self._typed)

  def extract_identity(self, anon: jax.Array) -> dict[str, jax.Array]:
    return extract_identity(self.nets, self.variables, anon, **self._typed)

  def restore(self, anon, identity, hide_bits, noise) -> dict[str, jax.Array]:
    return restore(self.nets, self.variables, anon, identity, hide_bits, list(noise),
                   **self._typed)

  def official_anonymize(self, x, z, noise) -> dict[str, jax.Array]:
    return official_anonymize(self.nets, self.variables, x, z, list(noise), **self._typed)

  def official_recover(self, anon, hide_bits, noise) -> dict[str, jax.Array]:
    return official_recover(self.nets, self.variables, anon, hide_bits, list(noise),
                            **self._typed)
