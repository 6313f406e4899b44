"""Fitting the keyed payload code to a measured channel: which bit positions (of which
groups of values) carry coded bits, which inner code writes each Reed-Solomon byte, and
how many bits per identity value are sent (`secure_payload` fitted layouts), from the extractor's
logits on faces whose hidden bits are known.

A channel sample is `signed` (F, 512, 32): per face, the extractor's logit
times +1 where the hidden bit was 1 and -1 where it was 0 (positive: read
right, negative: read wrong, magnitude: confidence). Per face and set of cells
(groups of VALUE_GROUP values x positions), the signed logits' distribution there is a histogram
of 2 * HALF_BINS + 1 bins (magnitudes rounded up, so that a wrong reading never
becomes a tie); P_w, the chance that the sum of w independent draws is < 0 (a
tie counting half), is the chance that the inner decoder prefers a codeword at
distance w to the one sent. Then, per face:
  byte error       uncoded (N = 8): 1 - (1 - P_1)^8; else the union bound
                   sum_w A_w P_w over the inner code's distance distribution A
                   (at most 1); where no layout of a bits-per-value choice meets
                   the target by that bound, the most promising (up to
                   MC_LAYOUTS) get the smaller of it and a simulation of the
                   inner decoder on the measured distribution
                   (`simulated_byte_errors`);
                   raised to its upper Z_MARGIN-sigma (Wilson) bound for the
                   number of bytes (measured, or simulated) behind it
  codeword failure P(byte errors > parity // 2) for binomial byte errors
                   (hard-decision Reed-Solomon, without the erasure retries'
                   gain)
  face failure     1 - (1 - codeword failure)^codewords,
averaged over the sample's faces (a face with a bad channel counts whole) and
taken at the worst of the channel conditions measured (PNG, JPEG, paste-back).
The cells tried: the k positions of the lowest error rate, k = 1..32, in all values;
and when groups of values differ in error rate beyond noise (`region_matters`), the g
best groups, g = 1..15, with a few position counts (8, 16, 24, 32 and those that did
best in all values).
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
MC_POOLED = 1024  # simulated bytes where the union bound is loose: all faces together
MC_FACE = 1024    # ... then per face
MC_LAYOUTS = 16   # layouts simulated per bits-per-value choice, at most
REGION_Z = 5.0    # groups of values differing by this many standard errors: fit per group
MIN_COSINE = 0.99  # the recovered identity's cosine to the original a layout must keep


@dataclasses.dataclass(frozen=True)
class Shape:
  """The Reed-Solomon shape of a fitted layout (`secure_payload.geometry`)."""
  name: str
  n_codewords: int
  codeword_bytes: int
  data_bytes: int

  @property
  def parity_bytes(self) -> int:
    return self.codeword_bytes - self.data_bytes


@dataclasses.dataclass(frozen=True)
class Candidate:
  layout: str
  value_bits: int
  inner: int      # bits per byte (inner code length)
  positions: int
  groups: int     # groups of VALUE_GROUP values
  failure: float  # face decoding failure probability (upper bound, worst condition)

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Fit:
  best: Candidate
  meets_target: bool
  target: float
  capacity_bits: float   # Shannon capacity of the worst condition, all 16384 slots (BSC per cell)
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
  """(F, 512, 32) signed logits -> (F, N_GROUPS, 32, 2 * HALF_BINS + 1) counts per face,
  group of values and position; bin HALF_BINS + k holds logits in ((k - 1) w, k w] for
  k > 0 (mirrored below 0; exact zeros in bin HALF_BINS)."""
  k = np.sign(signed) * np.minimum(np.ceil(np.abs(signed) / width), HALF_BINS)
  index = (k + HALF_BINS).astype(np.int64)  # (F, 512, 32)
  n_faces, bins = signed.shape[0], 2 * HALF_BINS + 1
  group = np.arange(sp.IDENTITY_DIM) // sp.VALUE_GROUP
  cell = (np.arange(n_faces)[:, None, None] * sp.N_GROUPS + group[:, None]) * 32 + np.arange(32)
  counts = np.bincount((cell * bins + index).ravel(), minlength=n_faces * sp.N_GROUPS * 32 * bins)
  return counts.reshape(n_faces, sp.N_GROUPS, 32, bins)


def region_matters(signed: np.ndarray, z: float = REGION_Z) -> bool:
  """Whether some group of values has an error rate more than `z` standard errors from the
  rest's, in signed logits (F, 512, 32)."""
  wrong = (signed < 0) + 0.5 * (signed == 0)
  per_group = wrong.reshape(len(signed), sp.N_GROUPS, -1).mean(axis=(0, 2))
  rate = wrong.mean()
  n = wrong.size / sp.N_GROUPS
  return bool(np.max(np.abs(per_group - rate)) > z * np.sqrt(max(rate * (1 - rate), 1e-12) / n))


def pairwise_errors(pmf: np.ndarray, most: int) -> np.ndarray:
  """(F, 2 * HALF_BINS + 1) pmfs over signed bins -> (F, most + 1): column w is P(sum of
  w draws < 0) + P(sum = 0) / 2 (column 0 is 0). Sums by FFT (absolute error ~1e-15)."""
  length = 1 << (2 * HALF_BINS * most).bit_length()  # >= the sum's support, a power of two
  spectrum = np.fft.rfft(pmf, n=length, axis=1)
  out = [np.zeros(len(pmf))]
  power = np.ones_like(spectrum)
  for w in range(1, most + 1):
    power = power * spectrum
    total = np.clip(np.fft.irfft(power, n=length, axis=1), 0, None)
    middle = HALF_BINS * w
    out.append(np.minimum(total[:, :middle].sum(axis=1) + 0.5 * total[:, middle], 1.0))
  return np.stack(out, axis=1)


def byte_errors(pairwise: np.ndarray, inner: int) -> np.ndarray:
  """(F, W) `pairwise_errors` -> (F,) error rate of a byte written with the [inner, 8] code."""
  if inner == 8:
    return -np.expm1(8 * np.log1p(-np.minimum(pairwise[:, 1], 1 - 1e-15)))
  weights = sp.inner_weights(inner)
  return np.minimum(pairwise[:, :len(weights)] @ weights, 1.0)


def wilson_upper(rate: np.ndarray, n: float, z: float = Z_MARGIN) -> np.ndarray:
  """One-sided upper Wilson bound of an error rate measured on n trials."""
  rate = np.clip(rate, 0.0, 1.0)
  centre = rate + z * z / (2 * n)
  spread = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
  return np.minimum((centre + spread) / (1 + z * z / n), 1.0)


def face_failure(lay: "sp.Layout | Shape", byte_error: np.ndarray) -> float:
  """Mean over faces of the decoding failure probability of `lay`, given each face's
  byte error rate (F,)."""
  word = stats.binom.sf(lay.parity_bytes // 2, lay.codeword_bytes, byte_error)
  return float(np.mean(-np.expm1(lay.n_codewords * np.log1p(-np.minimum(word, 1 - 1e-15)))))


def capacity(cell_errors: np.ndarray) -> float:
  """Bits a binary symmetric channel of error rates (N_GROUPS, 32) per group of values and
  position carries in the 512 values (its Shannon capacity)."""
  e = np.clip(np.asarray(cell_errors, np.float64), 1e-12, 0.5)
  entropy = -(e * np.log2(e) + (1 - e) * np.log2(1 - e))
  return float(sp.VALUE_GROUP * np.sum(1 - entropy))


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


def simulated_byte_errors(pmf: np.ndarray, inner: int, draws: int) -> np.ndarray:
  """(F, 2 * HALF_BINS + 1) pmfs -> (F,) error rate of the inner code's maximum-likelihood
  decoder, by `draws` simulated bytes per face: with the zero codeword sent (no loss of
  generality for a linear code read by correlation on a channel symmetric in the bit
  sent), an error when some other codeword's correlation is not below it (ties lose)."""
  uniforms = np.random.default_rng(0).random((draws, inner))
  cdf = np.cumsum(pmf, axis=1)
  cdf[:, -1] = 1.0
  ones = sp.inner_code(inner)[1:].T.astype(np.float32)  # (inner, 255)
  out = []
  for c in cdf:
    signed = (np.searchsorted(c, uniforms) - HALF_BINS).astype(np.float32)
    out.append(np.mean((signed @ ones).min(axis=1) <= 0))
  return np.asarray(out)


def _simulated(pmfs, inner, n_bytes, errors, shape, target):
  """Byte error rates refined by simulation where the union bound is loose: first with
  the faces pooled (MC_POOLED draws), and when that meets the target for `shape`, per
  face (MC_FACE draws); each the smaller of its union bound and its simulated rate's
  upper bound. pmfs: {condition: (F, bins) per-face pmfs}."""
  refined = {}
  for name, pmf in pmfs.items():
    pooled = pmf.mean(axis=0, keepdims=True)
    rate = wilson_upper(simulated_byte_errors(pooled, inner, MC_POOLED),
                        min(MC_POOLED, n_bytes * len(pmf)))
    if face_failure(shape, rate) > target:
      return errors
    rate = wilson_upper(simulated_byte_errors(pmf, inner, MC_FACE), min(MC_FACE, n_bytes))
    refined[name] = np.minimum(errors[name], rate)
  return refined


def _cell_errors(hist: np.ndarray) -> np.ndarray:
  """(F, G, 32, bins) histograms -> (G, 32) error rates (a tie counts half)."""
  counts = hist.sum(axis=0).astype(np.float64)
  return (counts[..., :HALF_BINS].sum(axis=-1) + 0.5 * counts[..., HALF_BINS]) / counts.sum(axis=-1)


@dataclasses.dataclass
class _Option:
  """Cells (value groups x positions) and an inner code length, with its layouts (one per
  bits-per-value choice that fits) and its per-face byte error bounds per condition."""
  groups: list
  positions: list
  inner: int
  n_bytes: float
  shapes: dict   # bits per value -> Shape
  errors: dict   # condition -> (F,) byte error bounds
  pmfs: dict     # condition -> (F, bins) signed-logit pmfs over the cells

  def failure(self, q: int) -> float:
    """The face failure bound of the layout of q bits per value, at the worst condition."""
    return max(face_failure(self.shapes[q], e) for e in self.errors.values())

  def candidate(self, q: int) -> Candidate:
    return Candidate(self.shapes[q].name, q, self.inner, len(self.positions), len(self.groups),
                     self.failure(q))


def _options(hists, cell_sets, choices) -> list[_Option]:
  """An _Option per (groups, positions) of `cell_sets` and inner code length with a layout
  for some bits per value in `choices`."""
  out = []
  for groups, positions in cell_sets:
    pmfs, pairwise = {}, {}
    for name, h in hists.items():
      pmf = h[:, groups][:, :, positions].sum(axis=(1, 2)).astype(np.float64)
      pmfs[name] = pmf / pmf.sum(axis=1, keepdims=True)
      pairwise[name] = pairwise_errors(pmfs[name], max(sp.INNER_LENGTHS))
    n_slots = sp.VALUE_GROUP * len(groups) * len(positions)
    for inner in sp.INNER_LENGTHS:
      shapes = {}
      for q in choices:
        try:
          shapes[q] = Shape(sp.fitted_name(positions, inner, q, groups),
                            *sp.geometry(n_slots, inner, q))
        except ValueError:
          continue  # too few slots for the message
      if shapes:
        n_bytes = n_slots / inner
        out.append(_Option(groups, positions, inner, n_bytes, shapes,
                           {name: wilson_upper(byte_errors(e, inner), n_bytes)
                            for name, e in pairwise.items()}, pmfs))
  return out


def fit(conditions: Mapping[str, np.ndarray], target: float = TARGET,
        identities: np.ndarray | None = None) -> Fit:
  """The fitted layout for channel samples {condition name: signed logits (F, 512, 32)}.

  identities: the sample's identities (N, 512), to check each bits-per-value choice
  keeps the cosine >= MIN_COSINE (standard normal stand-ins when None).
  """
  width = bin_width(conditions)
  hists = {name: histograms(s, width) for name, s in conditions.items()}
  ber = [np.mean(s < 0, axis=(0, 1)) + 0.5 * np.mean(s == 0, axis=(0, 1))
         for s in conditions.values()]
  ranking = np.argsort(np.max(np.stack(ber), axis=0), kind="stable")  # positions, best first
  cells = np.max(np.stack([_cell_errors(h) for h in hists.values()]), axis=0)  # (G, 32)
  cosines = quantization_cosines(identities)
  choices = [q for q in sp.VALUE_BIT_CHOICES if cosines[q] >= MIN_COSINE]
  everything = list(range(sp.N_GROUPS))
  options = _options(hists, [(everything, sorted(ranking[:k].tolist()))
                             for k in range(1, sp.VALUE_BITS + 1)], choices)
  if any(region_matters(c) for c in conditions.values()):
    # fewer groups of values, with a few position counts and those that did best on all
    group_ranking = np.argsort(cells.mean(axis=1), kind="stable")
    ks = {8, 16, 24, sp.VALUE_BITS}
    for q in choices:
      mine = [o for o in options if q in o.shapes]
      if mine:
        ks.add(len(min(mine, key=lambda o: o.failure(q)).positions))
    options += _options(hists, [(sorted(group_ranking[:g].tolist()),
                                 sorted(ranking[:k].tolist()))
                                for g in range(1, sp.N_GROUPS) for k in sorted(ks)], choices)
  # where no layout of a bits-per-value meets the target by the union bound, simulate the
  # inner decoder on the most promising ones (lowest bound first) until one does
  for q in choices:
    tried = 0
    for option in sorted((o for o in options if q in o.shapes), key=lambda o: o.failure(q)):
      if option.failure(q) <= target or tried == MC_LAYOUTS:
        break
      if option.inner == 8:
        continue
      tried += 1
      option.errors = _simulated(option.pmfs, option.inner, option.n_bytes, option.errors,
                                 option.shapes[q], target)
      if option.failure(q) <= target:
        break
  best_per_q: dict[int, Candidate] = {}
  for option in options:
    for q in option.shapes:
      cand = option.candidate(q)
      if q not in best_per_q or cand.failure < best_per_q[q].failure:
        best_per_q[q] = cand
  if not best_per_q:
    raise ValueError("no fitted layout holds the message with its parity")
  meeting = [c for c in best_per_q.values() if c.failure <= target]
  if meeting:
    best = max(meeting, key=lambda c: (c.value_bits, -c.failure))
  else:
    best = min(best_per_q.values(), key=lambda c: (c.failure, -c.value_bits))
  return Fit(best, bool(meeting), target,
             capacity_bits=min(capacity(_cell_errors(h)) for h in hists.values()),
             message_bits={q: 8 * sp.message_bytes(q, sp.FITTED_VERSION) for q in choices},
             cosines=cosines,
             candidates=sorted(best_per_q.values(), key=lambda c: -c.value_bits))
