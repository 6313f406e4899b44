"""Fitting the keyed payload code to a measured channel: which bit positions carry
coded bits, how often each coded bit is written, and how many bits per identity
value are sent (`secure_payload` fitted layouts), from the extractor's logits on
faces whose hidden bits are known.

A channel sample is `signed` (F, 512, 32): per face, the extractor's logit
times +1 where the hidden bit was 1 and -1 where it was 0 (positive: read
right, negative: read wrong, magnitude: confidence). The decoder sums the
logits of a coded bit's R copies and takes the sign, so per face and layout the
coded bit error rate is that of the sum of R independent draws from the face's
signed-logit distribution over the layout's positions (histograms of
2 * HALF_BINS + 1 bins, magnitudes rounded up, so that a wrong reading never
becomes a tie; a tie counts half). The rate is raised to its upper
Z_MARGIN-sigma (Wilson) bound for the number of bits behind it, then:
  byte error       1 - (1 - e)^8 (bytes of bits in random slots)
  codeword failure P(byte errors > parity // 2) for binomial byte errors
                   (hard-decision Reed-Solomon, without the erasure retries'
                   gain)
  face failure     1 - (1 - codeword failure)^codewords,
averaged over the sample's faces (a face with a bad channel counts whole) and
taken at the worst of the channel conditions measured (PNG, JPEG, paste-back).
`fit` picks, among layouts whose face failure is below `target`, the most bits
per value (identity fidelity), then the lowest failure.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from g2face_jax.privacy import secure_payload as sp

HALF_BINS = 24
Z_MARGIN = 3.0  # one-sided upper bound of the measured error rates (99.87%)
TARGET = 1e-6   # default face decoding failure probability to stay under
MIN_COSINE = 0.99  # the recovered identity's cosine to the original a layout must keep


@dataclasses.dataclass(frozen=True)
class Candidate:
  layout: str
  value_bits: int
  repetition: int
  positions: int
  failure: float  # face decoding failure probability (upper bound, worst condition)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Fit:
  best: Candidate
  meets_target: bool
  target: float
  capacity_bits: float   # Shannon capacity of the worst condition, all 16384 slots (BSC per position)
  message_bits: dict     # bits per value -> message bits of a fitted layout
  cosines: dict          # bits per value -> smallest identity cosine of the quantization (sample)
  candidates: list       # the best candidate per bits per value

  def as_dict(self) -> dict:
    return dict(layout=self.best.layout, failure=self.best.failure,
                meets_target=self.meets_target, target=self.target,
                capacity_bits=self.capacity_bits,
                message_bits={str(k): v for k, v in self.message_bits.items()},
                cosines={str(k): v for k, v in self.cosines.items()},
                candidates=[c.as_dict() for c in self.candidates])


def signed_logits(bits: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Hidden bits {0, 1} and the extractor's logits, both (..., 512, 32) -> logits signed
  so that positive means read right."""
  return np.asarray(logits, np.float64) * (2 * np.asarray(bits, np.float64) - 1)


def bin_width(conditions: Mapping[str, np.ndarray]) -> float:
  """The histogram bin width: the 99th percentile of |logit| over all conditions / HALF_BINS."""
  every = np.concatenate([np.abs(s).ravel() for s in conditions.values()])
  return max(float(np.percentile(every, 99)), 1e-6) / HALF_BINS


def histograms(signed: np.ndarray, width: float) -> np.ndarray:
  """(F, 512, 32) signed logits -> (F, 32, 2 * HALF_BINS + 1) counts per face and position;
  bin HALF_BINS + k holds logits in ((k - 1) w, k w] for k > 0 (mirrored below 0; exact
  zeros in bin HALF_BINS)."""
  k = np.sign(signed) * np.minimum(np.ceil(np.abs(signed) / width), HALF_BINS)
  index = (k + HALF_BINS).astype(np.int64)  # (F, 512, 32)
  n_faces = signed.shape[0]
  flat = (np.arange(n_faces)[:, None, None] * 32 + np.arange(32)) * (2 * HALF_BINS + 1) + index
  counts = np.bincount(flat.ravel(), minlength=n_faces * 32 * (2 * HALF_BINS + 1))
  return counts.reshape(n_faces, 32, 2 * HALF_BINS + 1)


def _errors_of_sums(pmf: np.ndarray, most: int) -> list[np.ndarray]:
  """(F, B) pmfs over signed bins -> per R = 1..most, (F,) P(sum of R draws < 0) + P(= 0) / 2."""
  total, out = pmf, []
  for repetition in range(1, most + 1):
    if repetition > 1:
      total = np.stack([np.convolve(t, p) for t, p in zip(total, pmf)])
    middle = (total.shape[1] - 1) // 2
    out.append(total[:, :middle].sum(axis=1) + 0.5 * total[:, middle])
  return out


def wilson_upper(rate: np.ndarray, n: float, z: float = Z_MARGIN) -> np.ndarray:
  """One-sided upper Wilson bound of an error rate measured on n trials."""
  rate = np.clip(rate, 0.0, 1.0)
  centre = rate + z * z / (2 * n)
  spread = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
  return np.minimum((centre + spread) / (1 + z * z / n), 1.0)


def face_failure(lay: sp.Layout, bit_errors: np.ndarray) -> float:
  """Mean over faces of the decoding failure probability of `lay`, given each face's
  coded bit error rate (F,)."""
  byte = -np.expm1(8 * np.log1p(-np.minimum(bit_errors, 1 - 1e-15)))
  word = stats.binom.sf(lay.parity_bytes // 2, lay.codeword_bytes, byte)
  return float(np.mean(-np.expm1(lay.n_codewords * np.log1p(-np.minimum(word, 1 - 1e-15)))))


def capacity(ber: np.ndarray) -> float:
  """Bits a binary symmetric channel of per-position error rates ber (32,) carries in the
  512 values (its Shannon capacity)."""
  e = np.clip(np.asarray(ber, np.float64), 1e-12, 0.5)
  entropy = -(e * np.log2(e) + (1 - e) * np.log2(1 - e))
  return float(sp.IDENTITY_DIM * np.sum(1 - entropy))


def quantization_cosines(identities: np.ndarray | None) -> dict[int, float]:
  """Smallest cosine between identities (N, 512) and their quantization at each bits per
  value (standard normal stand-ins when None)."""
  if identities is None or len(identities) == 0:
    identities = np.random.default_rng(0).standard_normal((64, sp.IDENTITY_DIM))
  out = {}
  for q in sp.VALUE_BIT_CHOICES:
    worst = 1.0
    for identity in np.asarray(identities, np.float64):
      back = sp.dequantize(sp.quantize(identity, q), q).astype(np.float64)
      worst = min(worst, float(back @ identity / max(np.linalg.norm(back) * np.linalg.norm(identity), 1e-30)))
    out[q] = worst
  return out


def fit(conditions: Mapping[str, np.ndarray], target: float = TARGET,
        identities: np.ndarray | None = None) -> Fit:
  """The fitted layout for channel samples {condition name: signed logits (F, 512, 32)}.

  identities: the sample's identities (N, 512), to check each bits-per-value choice
  keeps the cosine >= MIN_COSINE (standard normal stand-ins when None).
  """
  width = bin_width(conditions)
  hists = {name: histograms(s, width) for name, s in conditions.items()}
  ber = {name: np.mean(s < 0, axis=(0, 1)) + 0.5 * np.mean(s == 0, axis=(0, 1))
         for name, s in conditions.items()}
  worst_ber = np.max(np.stack(list(ber.values())), axis=0)
  ranking = np.argsort(worst_ber, kind="stable")
  cosines = quantization_cosines(identities)
  choices = [q for q in sp.VALUE_BIT_CHOICES if cosines[q] >= MIN_COSINE]
  best_per_q: dict[int, Candidate] = {}
  for k in range(1, sp.VALUE_BITS + 1):
    positions = sorted(ranking[:k].tolist())
    sums = {}
    for name, h in hists.items():
      pmf = h[:, positions].sum(axis=1).astype(np.float64)
      sums[name] = _errors_of_sums(pmf / pmf.sum(axis=1, keepdims=True), sp.MAX_REPETITION)
    for repetition in range(1, sp.MAX_REPETITION + 1):
      n_bits = sp.IDENTITY_DIM * len(positions) / repetition
      errors = {name: wilson_upper(e[repetition - 1], n_bits) for name, e in sums.items()}
      for q in choices:
        name_ = sp.fitted_name(positions, repetition, q)
        try:
          lay = sp.layout(name_)
        except ValueError:
          continue  # too few slots for the message
        failure = max(face_failure(lay, e) for e in errors.values())
        cand = Candidate(name_, q, repetition, len(positions), failure)
        if q not in best_per_q or failure < best_per_q[q].failure:
          best_per_q[q] = cand
  if not best_per_q:
    raise ValueError("no fitted layout holds the message with its parity")
  meeting = [c for c in best_per_q.values() if c.failure <= target]
  if meeting:
    best = max(meeting, key=lambda c: (c.value_bits, -c.failure))
  else:
    best = min(best_per_q.values(), key=lambda c: (c.failure, -c.value_bits))
  return Fit(best, bool(meeting), target,
             capacity_bits=min(capacity(b) for b in ber.values()),
             message_bits={q: 8 * sp.message_bytes(q, sp.FITTED_VERSION) for q in choices},
             cosines=cosines,
             candidates=sorted(best_per_q.values(), key=lambda c: -c.value_bits))
