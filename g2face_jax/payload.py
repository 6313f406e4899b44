"""Identity <-> the 16384 password bits hidden in the decoder.

The official codec: each of the 512 float32 identity values becomes its 32
IEEE-754 bits, sign first, then 8 exponent bits, then 23 mantissa bits, most
significant first; (B, 512) <-> (B, 512, 32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

N_VALUE_BITS = 32
OFFICIAL_ZERO = 1e-8  # the official encoder writes 0.0 as the pattern of 1e-8
OFFICIAL_CLAMP = 50.0  # the official test zeroes decoded values outside [-50, 50]

_SHIFTS = np.arange(N_VALUE_BITS - 1, -1, -1, dtype=np.uint32)  # MSB first


def float_to_bits(values: jax.Array) -> jax.Array:
  """(..., N) float32 -> (..., N, 32) float32 bits in {0, 1}.

  The IEEE pattern of every value, with the official encoder's quirk of
  writing an exact zero as 1e-8. (The official encoder only handles
  2^-104 <= |x| < 512 and mis-encodes a few values one ulp below a power of
  two; this is the IEEE pattern it means for every value.)
  """
  values = jnp.asarray(values, jnp.float32)
  values = jnp.where(values == 0, jnp.float32(OFFICIAL_ZERO), values)
  pattern = jax.lax.bitcast_convert_type(values, jnp.uint32)
  return ((pattern[..., None] >> _SHIFTS) & 1).astype(jnp.float32)


def bits_to_float(bits: jax.Array) -> jax.Array:
  """(..., 32) bits in {0, 1} -> (...) float32 by the official formula.

  (-1)^s * 2^(e-127) * (1 + sum_i m_i 2^-i) for every exponent: e = 255
  gives +-inf (never NaN), e = 0 gives the tiny value 2^-127 * (1 + m)
  (which XLA may flush to zero). Every other pattern decodes to exactly its
  IEEE float.
  """
  b = jnp.asarray(bits).astype(jnp.uint32)
  pattern = jnp.sum(b << _SHIFTS, axis=-1, dtype=jnp.uint32)
  ieee = jax.lax.bitcast_convert_type(pattern, jnp.float32)
  exponent = (pattern >> 23) & 0xFF
  sign = jnp.where(b[..., 0] == 1, jnp.float32(-1), jnp.float32(1))
  mantissa = 1.0 + (pattern & 0x7FFFFF).astype(jnp.float32) * jnp.float32(2.0 ** -23)
  tiny = sign * jnp.ldexp(mantissa, jnp.int32(-127))
  return jnp.where(exponent == 255, sign * jnp.inf, jnp.where(exponent == 0, tiny, ieee))


def bits_from_logits(logits: jax.Array) -> jax.Array:
  """Extractor logits -> bits as the official test rounds them: round(sigmoid(x)),
  half to even (so a logit within ~6e-8 of 0 gives 0)."""
  return jnp.round(jax.nn.sigmoid(logits.astype(jnp.float32)))


def decode_identity(bits: jax.Array, clamp: float = OFFICIAL_CLAMP) -> jax.Array:
  """(..., 512, 32) bits -> (..., 512) identity, values outside [-clamp, clamp] set to 0."""
  values = bits_to_float(bits)
  return jnp.where(jnp.abs(values) > clamp, jnp.float32(0), values)
