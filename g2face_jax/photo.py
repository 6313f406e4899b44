"""The faces of one photo with a key: `Anonymizer` (anonymize, recover, verify).

Anonymize, per face (detected, or the whole image with `aligned`): align to the
model's crop; ArcFace identity and 3DMM coefficients; the dummy-identity input
z from the key (`consistent`: a key rotation of the identity; `random`: drawn
from the key and the photo); the identity encoded into the 16384 hidden bits
(`secure`: keyed, authenticated, error-corrected; `official`: the float32
bits, readable by anyone with the model); decoder noise from the key; decode;
paste back. Same key and same pixels give the same output bytes.

Faces are found by CenterFace (`faces.detect_batch`, scores above `threshold`).
A face whose alignment square is smaller than `min_face`, or that is turned
further than `faces.MAX_PROFILE` (`faces.profile`), is not given to the
generator but obscured in place by the `small_faces` fallback (`obscure`:
pixelate, fill or blur; or 'g2face', the generator anyway); such a face hides
no identity and cannot be recovered. The generator's faces of a photo run as
batches (`in_batches`); each is pasted back through the face-shaped mask
(`faces.face_mask`), so pixels away from the faces keep their bytes. With `keep`
reference identities, the faces whose ArcFace identity matches one (cosine >=
the match threshold) are left as they are (method KEPT); with `only`, the
faces that match none are.

An anonymized photo is written as a PNG without the input's metadata, holding
one text chunk `g2face` (STAMP_FORMAT, JSON) with what recovery needs that is
not secret: the codec, the payload layout, the model size, `aligned`, each
face's alignment square and the method that treated it. Recovery without it
re-detects the faces.

Recover, per face anonymized by G2Face (obscured and kept faces are skipped): extract
the logits, decode the payload (a wrong key or a damaged payload is an error,
never a face), run the decoder back to the identity with the extracted bits as
the hidden code, paste back.
Verify: cosine between the identity hidden in an anonymized photo and the
ArcFace identity of a reference photo's largest face.

Photos are (H, W, 3) uint8 RGB (`images.read`); crops are (S, S, 3) float32 in
[-1, 1], batches (B, S, S, 3). The batch methods (`identities`,
`anonymize_crops`, `extract_logits`, `restore_crops`) with the key's draws
(`face_code`, `recover_noise`) and `read_payload` are the public API that
video builds on.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Sequence

import jax
import numpy as np

from g2face_jax import bundle as bundle_lib
from g2face_jax import detection, faces, images, models, obscure, payload, pipeline
from g2face_jax.nn import decoder
from g2face_jax.privacy import keys, secure_payload

IDENTITY_MODES = ("consistent", "random")
CODECS = ("secure", "official")
STAMP_KEY = "g2face"
STAMP_FORMAT = "g2face-anonymized/2"
OLD_STAMP_FORMATS = ("g2face-anonymized/1",)  # still read: every face by G2Face
GENERATOR = "g2face"  # the method of a face anonymized by the generator
KEPT = "kept"  # the method of a face left as it is (--keep / --only)
SMALL_FACES = obscure.METHODS + (GENERATOR,)  # what a face under min_face gets
DEFAULT_SMALL_FACES = obscure.DEFAULT
MAX_BATCH = 16  # most faces of a photo per jitted call (`in_batches`)
VERIFY_THRESHOLD = 0.3  # conventional ArcFace cosine threshold, not calibrated on any bundle
MATCH_THRESHOLD = VERIFY_THRESHOLD  # ArcFace cosine from which a face is a --keep/--only person
NEEDS = dict(anonymize=("arcface", "recon_net", "map_2_id", "style_mapper", "decoder"),
             recover=("extractor", "recon_net", "style_mapper", "decoder"),
             verify=("extractor", "arcface"))


class FileError(ValueError):
  """One input's failure, as one line."""


def in_batches(fn, *columns: np.ndarray, largest: int = MAX_BATCH) -> tuple[np.ndarray, ...]:
  """fn(*rows) -> a tuple of (rows, ...) arrays, over all n rows of the columns in
  chunks whose sizes are powers of two up to `largest` (the binary digits of n: no
  padding, few compiled shapes). Every chunk is dispatched before any result is read,
  so the device works while the host slices; returns the outputs joined, on the host."""
  n, start, outs = len(columns[0]), 0, []
  while start < n:
    size = min(largest, 1 << ((n - start).bit_length() - 1))
    outs.append(fn(*[c[start:start + size] for c in columns]))
    start += size
  return tuple(np.concatenate([np.asarray(o) for o in col]) for col in zip(*outs))


@dataclasses.dataclass(frozen=True)
class Stamp:
  """What an anonymized file carries for its recovery (nothing secret)."""
  codec: str
  layout: str | None       # secure payload layout; None for the official codec
  size: int                # model crop size
  aligned: bool            # the whole image is one aligned crop
  quads: tuple             # per face, the (4, 2) alignment square as nested lists
  methods: tuple = ()      # per face, GENERATOR, KEPT or the obscuring method; () = all GENERATOR

  def method(self, face: int) -> str:
    """How face `face` was treated: GENERATOR (recoverable), KEPT (left as it is) or an
    `obscure` method."""
    return self.methods[face] if self.methods else GENERATOR

  @property
  def obscured(self) -> tuple:
    """Indices of the faces that were obscured (not recoverable)."""
    return tuple(i for i in range(len(self.quads)) if self.method(i) in obscure.METHODS)

  @property
  def kept(self) -> tuple:
    """Indices of the faces left as they are (nothing to recover)."""
    return tuple(i for i in range(len(self.quads)) if self.method(i) == KEPT)

  def to_json(self) -> str:
    return json.dumps(dict(format=STAMP_FORMAT, codec=self.codec, layout=self.layout,
                           size=self.size, aligned=self.aligned, faces=list(self.quads),
                           methods=[self.method(i) for i in range(len(self.quads))]))

  @classmethod
  def from_json(cls, text: str) -> "Stamp":
    record = json.loads(text)
    if record.get("format") not in (STAMP_FORMAT,) + OLD_STAMP_FORMATS:
      raise ValueError(f"unknown g2face stamp format {record.get('format')!r}")
    quads = tuple(np.asarray(q, np.float64).reshape(4, 2).tolist() for q in record["faces"])
    if record["codec"] not in CODECS:
      raise ValueError(f"unknown codec {record['codec']!r}")
    methods = tuple(str(m) for m in record.get("methods") or ())
    if methods and (len(methods) != len(quads) or
                    any(m not in obscure.METHODS + (GENERATOR, KEPT) for m in methods)):
      raise ValueError("g2face stamp: bad per-face methods")
    if all(m == GENERATOR for m in methods):
      methods = ()
    return cls(record["codec"], record["layout"], int(record["size"]), bool(record["aligned"]),
               quads, methods)


def photo_digest(image: np.ndarray) -> bytes:
  """SHA-256 of a photo's pixels and shape: the per-photo context of the key draws."""
  h = hashlib.sha256(b"g2face/photo/v1/%dx%dx%d/" % image.shape)
  h.update(np.ascontiguousarray(image, np.uint8).tobytes())
  return h.digest()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Cosine of two identity vectors (512,), in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def reference_match(identity: np.ndarray, keep: Sequence[np.ndarray] = (),
                    only: Sequence[np.ndarray] = (),
                    threshold: float = MATCH_THRESHOLD) -> tuple[bool, float | None]:
  """(whether a face of ArcFace `identity` (512,) is left as it is, its best cosine with
  the reference identities or None without references): with `keep` references, when
  a cosine reaches `threshold`; with `only` references, when none does."""
  if keep and only:
    raise ValueError("give --keep or --only, not both")
  refs = keep or only
  if not refs:
    return False, None
  best = max(cosine(identity, r) for r in refs)
  return (best >= threshold) == bool(keep), best


def read(path: str) -> np.ndarray:
  """The photo at `path` (`images.read`); FileError with the reason (the caller names the file)."""
  try:
    return images.read(path)
  except images.ImageError as e:
    raise FileError(str(e).removeprefix(f"{path}: ")) from None


def write(path: str, image: np.ndarray, stamp: Stamp | None = None) -> None:
  """Write an (H, W, 3) uint8 photo as PNG with only the stamp as metadata; FileError."""
  try:
    images.write_png(path, image, {STAMP_KEY: stamp.to_json()} if stamp is not None else None)
  except images.ImageError as e:
    raise FileError(str(e)) from None


def read_stamp(path: str) -> Stamp | None:
  """The g2face stamp of an image file, or None when absent or unreadable."""
  text = images.read_text(path, STAMP_KEY)
  try:
    return Stamp.from_json(text) if text else None
  except (ValueError, KeyError, TypeError):
    return None


@functools.partial(jax.jit, static_argnums=0)
@pipeline.float32_matmuls
def _arcface(nets: models.Networks, variables, x):
  """x (B,S,S,3) in [-1,1] -> (B,512) ArcFace identities (only; no 3DMM)."""
  return nets.arcface.apply(variables["arcface"], x)


class Anonymizer:
  """Photo-level anonymize / recover / verify with a bundle and a key.

  bundle: a `bundle.Bundle` or its folder; key: a `keys.Key`.
  identity: 'consistent' or 'random' (virtual identity); codec: 'secure' or
  'official' (hidden bits); layout: secure payload layout; min_face: smallest
  face (alignment square side, photo pixels) given to the generator; small_faces:
  what a smaller (or turned) face gets (SMALL_FACES: an `obscure` method, or 'g2face'
  for the generator anyway); threshold: CenterFace's score from which a face is
  detected. `size` is the model's crop side S.
  """

  def __init__(self, bundle, key: keys.Key, *, identity: str = "consistent",
               codec: str = "secure", layout: str = secure_payload.DEFAULT_LAYOUT,
               min_face: float = faces.MIN_FACE, small_faces: str = DEFAULT_SMALL_FACES,
               threshold: float = detection.THRESHOLD):
    if identity not in IDENTITY_MODES:
      raise ValueError(f"unknown identity mode '{identity}'; known: {', '.join(IDENTITY_MODES)}")
    if small_faces not in SMALL_FACES:
      raise ValueError(f"unknown small-face method '{small_faces}'; known: "
                       f"{', '.join(SMALL_FACES)}")
    if not min_face >= 0:
      raise ValueError(f"min_face must be >= 0, got {min_face}")
    if codec not in CODECS:
      raise ValueError(f"unknown codec '{codec}'; known: {', '.join(CODECS)}")
    secure_payload.layout(layout)  # validates the name
    self.detector = detection.Detector(threshold)
    self.bundle = bundle if isinstance(bundle, bundle_lib.Bundle) else bundle_lib.load(bundle)
    self.key, self.identity, self.codec, self.layout = key, identity, codec, layout
    self.min_face, self.small_faces = float(min_face), small_faces
    self.size = int(self.bundle.config.model.size)
    self.nets = models.Networks.from_config(self.bundle.config.model)
    self._variables = None
    self._stages = None

  def require(self, operation: str) -> None:
    """BundleError (one line) if the bundle lacks a network `operation` needs."""
    self.bundle.require(*NEEDS[operation], purpose=operation)

  def has(self, network: str) -> bool:
    """Whether the bundle carries `network` (e.g. 'extractor')."""
    return network in self.bundle.variables

  @property
  def variables(self):
    """The bundle's pipeline variables, on the default device."""
    if self._variables is None:
      present = [n for n in models.INFERENCE_NETWORKS if n in self.bundle.variables]
      self._variables = {n: jax.device_put(self.bundle.variables[n]) for n in present}
    return self._variables

  @property
  def stages(self) -> pipeline.Stages:
    """The pipeline stages on this bundle's variables."""
    if self._stages is None:
      self._stages = pipeline.Stages(self.nets, self.variables)
    return self._stages

  @property
  def stamp_layout(self) -> str | None:
    """The payload layout a stamp records: the secure layout, None for the official codec."""
    return self.layout if self.codec == "secure" else None

  # --- faces of a photo ---

  def aligned_crop(self, image: np.ndarray) -> np.ndarray:
    """A square (H, H, 3) uint8 aligned face -> (S, S, 3) float32 crop in [-1, 1]
    (`images.resize` to S when H != S); FileError when it is not square."""
    h, w = image.shape[:2]
    if h != w:
      raise FileError(f"an aligned input must be square, got {w}x{h}")
    return images.to_unit(images.resize(image, self.size))

  def align(self, image: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """The (S, S, 3) float32 crop in [-1, 1] of the (4, 2) square `quad` of a photo."""
    return faces.align(image, quad, self.size)

  def detect_batch(self, photos: Sequence[np.ndarray]) -> list[list[faces.Face]]:
    """The faces of each photo (this tool's `detector`), left to right; the photos of
    one size (e.g. video frames) run as one batch."""
    return faces.from_detections(self.detector(list(photos)))

  def detect_faces(self, image: np.ndarray) -> list[faces.Face]:
    """The faces of a photo, left to right; FileError when none is found."""
    found = self.detect_batch([image])[0]
    if not found:
      raise FileError("no face found")
    return found

  def detect(self, image: np.ndarray) -> list[np.ndarray]:
    """The (4, 2) alignment squares of a photo's faces, left to right; FileError when
    none is found."""
    return [f.quad for f in self.detect_faces(image)]

  def method_for(self, side: float, profile: float = 0.0) -> str:
    """GENERATOR for a face whose alignment square has `side` >= min_face pixels and
    whose `faces.profile` is at most MAX_PROFILE, else the small-face method."""
    fits = side >= self.min_face and profile <= faces.MAX_PROFILE
    return GENERATOR if fits else self.small_faces

  def crops(self, image: np.ndarray, aligned: bool, quads=None) -> tuple[list, list | None]:
    """(crops (S, S, 3) in [-1, 1], their squares or None when `aligned`) of a photo;
    the squares are `quads` when given, else detected."""
    if aligned:
      return [self.aligned_crop(image)], None
    quads = [np.asarray(q) for q in quads] if quads else self.detect(image)
    return [self.align(image, q) for q in quads], quads

  def _compose(self, image: np.ndarray, crops: Sequence[np.ndarray], quads,
               methods: Sequence[str] | None = None) -> np.ndarray:
    """Paste each crop back over its quad; a face with an `obscure` method (its crop None)
    is obscured instead, after every paste (so no paste covers it again); a KEPT face is
    left as it is."""
    if quads is None:
      return images.to_uint8(crops[0])
    methods = list(methods) if methods else [GENERATOR] * len(quads)
    out = image
    for crop, quad, method in zip(crops, quads, methods):
      if method == GENERATOR:
        out, _ = faces.paste_back(out, crop, quad)
    for quad, method in zip(quads, methods):
      if method in obscure.METHODS:
        out = obscure.apply(out, quad, method)
    return out

  # --- the key's draws ---

  def _noise(self, context: bytes) -> list[np.ndarray]:
    return keys.decoder_noise(self.key, context, decoder.noise_shapes(self.size, 1))

  def face_code(self, identity: np.ndarray, context: bytes) -> tuple[np.ndarray, np.ndarray,
                                                                     list[np.ndarray]]:
    """The key-driven inputs of one face: dummy-identity input z (1, 512), hidden bits
    (1, 512, 32) of `identity` (512,) and decoder noise (per layer (1, r, r, 1));
    `context` names the face (random z, payload nonce, noise)."""
    arc_id = np.asarray(identity, np.float32)[None]
    if self.identity == "consistent":
      z = keys.consistent_z(self.key, arc_id)
    else:
      z = keys.random_z(self.key, context)[None]
    if self.codec == "secure":
      bits = secure_payload.encode(self.key, arc_id[0], context, self.layout)[None]
    else:
      bits = np.asarray(payload.float_to_bits(arc_id))
    return z, bits, self._noise(b"anonymize/" + context)

  def recover_noise(self, context: bytes) -> list[np.ndarray]:
    """The decoder noise of one face's recovery (per layer (1, r, r, 1)); `context`
    names the face as the anonymized file can name it again."""
    return self._noise(b"recover/" + context)

  def read_payload(self, logits: np.ndarray, codec: str, layout: str | None,
                   name: str) -> tuple[np.ndarray, np.ndarray]:
    """Extractor logits (512, 32) -> (identity (512,), hard bits (512, 32)); FileError
    starting with `name` when the payload is missing, damaged or locked with another key."""
    bits = np.asarray(payload.bits_from_logits(logits))
    if codec == "official":
      return np.asarray(payload.decode_identity(bits)), bits
    try:
      decoded = secure_payload.decode(  # no stamp: this tool's layout, then the fixed ones
          self.key, logits, layout or (self.layout,) + secure_payload.LAYOUTS)
    except secure_payload.AuthenticationError:
      raise FileError(f"{name}: wrong key or tampered payload (authentication failed)") from None
    except secure_payload.NoPayloadError:
      raise FileError(f"{name}: no g2face payload found (or damaged beyond repair)") from None
    except secure_payload.PayloadError as e:
      raise FileError(f"{name}: {e}") from None
    return decoded.identity, bits

  # --- batches of crops (B, S, S, 3) in [-1, 1] ---

  def identities(self, crops: np.ndarray) -> np.ndarray:
    """(B, 512) ArcFace identities of the crops (ArcFace only, no 3DMM)."""
    return np.asarray(_arcface(self.nets, self.variables, crops))

  def anonymize_crops(self, crops: np.ndarray, z: np.ndarray, bits: np.ndarray,
                      noise: Sequence[np.ndarray]) -> np.ndarray:
    """(B, S, S, 3) anonymized crops (unclipped) from z (B, 512), hidden bits (B, 512, 32)
    and per-layer noise (B, r, r, 1) (rows of `face_code`)."""
    coeff = self.stages.analyze(crops)["coeff"]
    return np.asarray(self.stages.anonymize(crops, coeff, z, bits, list(noise))["anon"])

  def extract_logits(self, crops: np.ndarray) -> np.ndarray:
    """(B, 512, 32) extractor logits of anonymized crops."""
    return np.asarray(self.stages.extract_identity(crops)["logits"])

  def restore_crops(self, crops: np.ndarray, identity: np.ndarray, bits: np.ndarray,
                    noise: Sequence[np.ndarray]) -> np.ndarray:
    """(B, S, S, 3) recovered crops from anonymized crops, hidden identities (B, 512),
    extracted bits (B, 512, 32) and per-layer noise (rows of `recover_noise`)."""
    return np.asarray(self.stages.restore(crops, identity, bits, list(noise))["recovered"])

  # --- the faces of one photo, in batches ---

  def _anonymize_faces(self, crops: Sequence[np.ndarray],
                       contexts: Sequence[bytes]) -> np.ndarray:
    """(n, S, S, 3) anonymized crops of n crops, face k's draws named by contexts[k]."""
    x = np.stack(crops)
    arc_id, coeff = in_batches(
        lambda c: tuple(self.stages.analyze(c)[k] for k in ("arc_id", "coeff")), x)
    codes = [self.face_code(a, c) for a, c in zip(arc_id, contexts)]
    z, bits = (np.concatenate([c[i] for c in codes]) for i in (0, 1))
    noise = [np.concatenate([c[2][layer] for c in codes]) for layer in range(len(codes[0][2]))]
    return in_batches(lambda *a: (self.stages.anonymize(*a[:4], a[4:])["anon"],),
                      x, coeff, z, bits, *noise)[0]

  def _hidden_identities(self, crops: np.ndarray, codec: str, layout: str | None,
                         numbers: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per anonymized crop of (n, S, S, 3): (identity (512,), extracted bits (512, 32));
    FileError naming the face's number on a payload that does not decode."""
    logits = in_batches(lambda c: (self.stages.extract_identity(c)["logits"],), crops)[0]
    return [self.read_payload(l, codec, layout, f"face {i}") for l, i in zip(logits, numbers)]

  # --- photos (arrays) ---

  def anonymize_photo(self, image: np.ndarray, aligned: bool = False, *,
                      keep: Sequence[np.ndarray] = (), only: Sequence[np.ndarray] = (),
                      match_threshold: float = MATCH_THRESHOLD
                      ) -> tuple[np.ndarray, Stamp, list[dict]]:
    """(H, W, 3) uint8 photo -> (anonymized photo, stamp, per face a JSON-ready record:
    method, detector score, side of the alignment square in pixels, and with references
    the best reference cosine). `keep` / `only`: reference identities (512,)
    (`reference_identities`); the faces they leave as they are (`reference_match`, on the
    ArcFace identities of all the photo's faces in one batch) get KEPT and are not
    touched by their own treatment (a neighbour's square that overlaps them still is).
    Other faces under `min_face` get the small-face method. FileError on a photo without
    faces, or with references on an `aligned` crop."""
    digest = photo_digest(image)
    refs = bool(keep) or bool(only)
    if aligned:
      if refs:
        raise FileError("--keep / --only need detected faces, not --aligned crops")
      anon = self._anonymize_faces([self.aligned_crop(image)], [digest + b"/face0"])[0]
      stamp = Stamp(self.codec, self.stamp_layout, self.size, True, ())
      return images.to_uint8(anon), stamp, [dict(method=GENERATOR)]
    found = self.detect_faces(image)
    crops = [self.align(image, f.quad) for f in found]
    matches = ([reference_match(i, keep, only, match_threshold)
                for i in self.identities(np.stack(crops))] if refs else
               [(False, None)] * len(found))
    methods = [KEPT if kept else self.method_for(f.side, f.profile)
               for f, (kept, _) in zip(found, matches)]
    chosen = [i for i, m in enumerate(methods) if m == GENERATOR]
    anons = [None] * len(found)
    if chosen:
      done = self._anonymize_faces([crops[i] for i in chosen],
                                   [digest + b"/face%d" % i for i in chosen])
      for i, anon in zip(chosen, done):
        anons[i] = anon
    quads = [f.quad for f in found]
    stamp = Stamp(self.codec, self.stamp_layout, self.size, False,
                  tuple(np.asarray(q).tolist() for q in quads),
                  () if all(m == GENERATOR for m in methods) else tuple(methods))
    records = [dict(method=m, score=round(f.score, 4), side=round(f.side, 1),
                    profile=round(f.profile, 2),
                    **({} if best is None else dict(reference_cosine=round(best, 4))))
               for f, m, (_, best) in zip(found, methods, matches)]
    return self._compose(image, anons, quads, methods), stamp, records

  def anonymize_image(self, image: np.ndarray, aligned: bool = False) -> tuple[np.ndarray, Stamp]:
    """(H, W, 3) uint8 photo -> (anonymized photo, stamp) (`anonymize_photo`)."""
    out, stamp, _ = self.anonymize_photo(image, aligned)
    return out, stamp

  def _stamp_or_default(self, stamp: Stamp | None, aligned: bool) -> Stamp:
    if stamp is None:
      return Stamp(self.codec, None, self.size, aligned, ())  # layout None: try every layout
    if stamp.size != self.size:
      raise FileError(f"anonymized with a {stamp.size}-pixel model, the bundle's is {self.size}")
    return stamp

  def hidden_identities(self, image: np.ndarray, stamp: Stamp | None = None,
                        aligned: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per face of an anonymized photo anonymized by G2Face (obscured and kept faces are
    left out): (identity (512,), extracted bits (512, 32))."""
    stamp = self._stamp_or_default(stamp, aligned)
    crops, _ = self.crops(image, stamp.aligned, stamp.quads)
    chosen = [i for i in range(len(crops)) if stamp.method(i) == GENERATOR]
    if not chosen:
      return []
    return self._hidden_identities(np.stack([crops[i] for i in chosen]), stamp.codec,
                                   stamp.layout, chosen)

  def recover_image(self, image: np.ndarray, stamp: Stamp | None = None,
                    aligned: bool = False) -> tuple[np.ndarray, int]:
    """Anonymized (H, W, 3) uint8 photo -> (recovered photo, number of faces recovered).
    Faces the stamp marks as obscured or kept stay as they are. FileError
    when a face's payload is missing, damaged or locked with another key."""
    stamp = self._stamp_or_default(stamp, aligned)
    crops, quads = self.crops(image, stamp.aligned, stamp.quads)
    digest = photo_digest(image)
    chosen = [i for i in range(len(crops)) if stamp.method(i) == GENERATOR]
    recovered, n = [None] * len(crops), len(chosen)
    if chosen:
      x = np.stack([crops[i] for i in chosen])
      hidden = self._hidden_identities(x, stamp.codec, stamp.layout, chosen)
      identity, bits = (np.stack([h[k] for h in hidden]) for k in (0, 1))
      draws = [self.recover_noise(digest + b"/face%d" % i) for i in chosen]
      noise = [np.concatenate([d[layer] for d in draws]) for layer in range(len(draws[0]))]
      done = in_batches(lambda *a: (self.stages.restore(*a[:3], a[3:])["recovered"],),
                        x, identity, bits, *noise)[0]
      for i, crop in zip(chosen, done):
        recovered[i] = crop
    if quads is None:
      return images.to_uint8(recovered[0]), n
    out = image
    for crop, quad in zip(recovered, quads):
      if crop is not None:
        out, _ = faces.paste_back(out, crop, quad)
    return out, n

  def reference_identity(self, image: np.ndarray, aligned: bool = False) -> np.ndarray:
    """ArcFace identity (512,) of the largest face of a reference photo (or of an aligned crop)."""
    if aligned:
      crop = self.aligned_crop(image)
    else:
      quad = max(self.detect(image), key=lambda q: np.linalg.norm(q[3] - q[0]))
      crop = self.align(image, quad)
    return np.asarray(self.stages.analyze(crop[None])["arc_id"][0])

  def reference_identities(self, paths: Sequence[str]) -> tuple:
    """ArcFace identities (512,) of the largest face of each reference photo (--keep /
    --only); FileError naming the photo."""
    out = []
    for path in paths:
      try:
        out.append(self.reference_identity(images.read(path)))
      except (images.ImageError, FileError) as e:
        raise FileError(f"reference {path}: {str(e).removeprefix(path + ': ')}") from None
    return tuple(out)

  def verify_image(self, anon: np.ndarray, reference: np.ndarray, stamp: Stamp | None = None,
                   aligned: bool = False) -> list[float]:
    """Cosine between each face's hidden identity and the reference identity."""
    ref = self.reference_identity(reference, aligned)
    return [cosine(identity, ref) for identity, _ in self.hidden_identities(anon, stamp, aligned)]
