"""Anonymize, recover and verify the faces of photos with a key: `Anonymizer`.

Anonymize, per face (detected, or the whole image with `aligned`): align to the
model's crop; ArcFace identity and 3DMM coefficients; the dummy-identity input
z from the key (`consistent`: a key rotation of the identity; `random`: drawn
from the key and the photo); the identity encoded into the 16384 hidden bits
(`secure`: keyed, authenticated, error-corrected; `official`: the float32
bits, readable by anyone with the model); decoder noise from the key; decode;
paste back. Same key and same pixels give the same output bytes.

The output is a PNG without the input's metadata, holding one text chunk
`g2face` (STAMP_FORMAT, JSON) with what recovery needs that is not secret: the
codec, the payload layout, the model size, `aligned` and each face's
alignment square. Recovery without it re-detects the faces.

Recover, per face: extract the logits, decode the payload (a wrong key or a
damaged payload is an error, never a face), run the decoder back to the
identity with the extracted bits as the hidden code, paste back.
Verify: cosine between the identity hidden in an anonymized photo and the
ArcFace identity of a reference photo's largest face.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, Sequence

import cv2
import jax
import numpy as np
from PIL import Image, PngImagePlugin

from g2face_jax import bundle as bundle_lib
from g2face_jax import faces, keys, payload, pipeline
from g2face_jax import secure_payload
from g2face_jax.nn import decoder

IDENTITY_MODES = ("consistent", "random")
CODECS = ("secure", "official")
STAMP_KEY = "g2face"
STAMP_FORMAT = "g2face-anonymized/1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VERIFY_THRESHOLD = 0.3  # conventional ArcFace cosine threshold, not calibrated on any bundle
NEEDS = dict(anonymize=("arcface", "recon_net", "map_2_id", "style_mapper", "decoder"),
             recover=("extractor", "recon_net", "style_mapper", "decoder"),
             verify=("extractor", "arcface"))


class FileError(ValueError):
  """One input's failure, as one line."""


@dataclasses.dataclass(frozen=True)
class Stamp:
  """What an anonymized file carries for its recovery (nothing secret)."""
  codec: str
  layout: str | None       # secure payload layout; None for the official codec
  size: int                # model crop size
  aligned: bool            # the whole image is one aligned crop
  quads: tuple             # per face, the (4, 2) alignment square as nested lists

  def to_json(self) -> str:
    return json.dumps(dict(format=STAMP_FORMAT, codec=self.codec, layout=self.layout,
                           size=self.size, aligned=self.aligned, faces=list(self.quads)))

  @classmethod
  def from_json(cls, text: str) -> "Stamp":
    record = json.loads(text)
    if record.get("format") != STAMP_FORMAT:
      raise ValueError(f"unknown g2face stamp format {record.get('format')!r}")
    quads = tuple(np.asarray(q, np.float64).reshape(4, 2).tolist() for q in record["faces"])
    if record["codec"] not in CODECS:
      raise ValueError(f"unknown codec {record['codec']!r}")
    return cls(record["codec"], record["layout"], int(record["size"]), bool(record["aligned"]),
               quads)


@dataclasses.dataclass
class FileResult:
  input: str
  output: str | None = None
  faces: int = 0
  error: str | None = None
  cosines: list | None = None  # verify only
  match: list | None = None    # verify only
  video: dict | None = None    # videos only: `video.anonymize_video` / `recover_video` summary

  @property
  def ok(self) -> bool:
    return self.error is None


def photo_digest(image: np.ndarray) -> bytes:
  """SHA-256 of a photo's pixels and shape: the per-photo context of the key draws."""
  h = hashlib.sha256(b"g2face/photo/v1/%dx%dx%d/" % image.shape)
  h.update(np.ascontiguousarray(image, np.uint8).tobytes())
  return h.digest()


def to_uint8(crop: np.ndarray) -> np.ndarray:
  """(S, S, 3) in [-1, 1] (clipped) -> uint8, as the official code writes images."""
  return np.round((np.clip(crop, -1, 1) + 1) * 127.5).astype(np.uint8)


def read_stamp(path: str) -> Stamp | None:
  """The g2face stamp of an image file, or None when absent or unreadable."""
  try:
    with Image.open(path) as im:
      text = getattr(im, "text", {}).get(STAMP_KEY)
    return Stamp.from_json(text) if text else None
  except (OSError, ValueError, KeyError, TypeError, Image.UnidentifiedImageError):
    return None


def write_png(path: str, image: np.ndarray, stamp: Stamp | None = None) -> None:
  """Write (H, W, 3) uint8 as PNG atomically (temporary file + rename); only the stamp as metadata."""
  folder = os.path.dirname(os.path.abspath(path))
  info = PngImagePlugin.PngInfo()
  if stamp is not None:
    info.add_itxt(STAMP_KEY, stamp.to_json())
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".g2face-", suffix=".png")
  except OSError as e:
    raise FileError(f"{path}: output not writable ({e.strerror or e})") from None
  try:
    with os.fdopen(fd, "wb") as f:
      Image.fromarray(image).save(f, format="PNG", pnginfo=info)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    os.unlink(tmp)
    raise FileError(f"{path}: output not writable ({e.strerror or e})") from None
  except BaseException:
    os.unlink(tmp)
    raise


class Anonymizer:
  """Photo-level anonymize / recover / verify with a bundle and a key.

  bundle: a `bundle.Bundle` or its folder; key: a `keys.Key`.
  identity: 'consistent' or 'random' (virtual identity); codec: 'secure' or
  'official' (hidden bits); layout: secure payload layout; min_face: smallest
  face (alignment square side, photo pixels) accepted.
  """

  def __init__(self, bundle, key: keys.Key, *, identity: str = "consistent",
               codec: str = "secure", layout: str = secure_payload.DEFAULT_LAYOUT,
               min_face: float = faces.MIN_FACE):
    if identity not in IDENTITY_MODES:
      raise ValueError(f"unknown identity mode '{identity}'; known: {', '.join(IDENTITY_MODES)}")
    if codec not in CODECS:
      raise ValueError(f"unknown codec '{codec}'; known: {', '.join(CODECS)}")
    secure_payload.layout(layout)  # validates the name
    self.bundle = bundle if isinstance(bundle, bundle_lib.Bundle) else bundle_lib.load(bundle)
    self.key, self.identity, self.codec, self.layout = key, identity, codec, layout
    self.min_face = min_face
    self.size = int(self.bundle.config.model.size)
    self.nets = pipeline.Networks.from_config(self.bundle.config.model)
    self._variables = None
    self._stages = None

  def require(self, operation: str) -> None:
    """BundleError (one line) if the bundle lacks a network `operation` needs."""
    self.bundle.require(*NEEDS[operation], purpose=operation)

  @property
  def variables(self):
    if self._variables is None:
      present = [n for n in pipeline.NETWORKS if n in self.bundle.variables]
      self._variables = {n: jax.device_put(self.bundle.variables[n]) for n in present}
    return self._variables

  @property
  def stages(self) -> pipeline.Stages:
    """The pipeline stages on this bundle's variables."""
    if self._stages is None:
      self._stages = pipeline.Stages(self.nets, self.variables)
    return self._stages

  # --- faces of a photo ---

  def _aligned_crop(self, image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if h != w:
      raise FileError(f"an aligned input must be square, got {w}x{h}")
    if h != self.size:
      image = cv2.resize(image, (self.size, self.size),
                         interpolation=cv2.INTER_AREA if h > self.size else cv2.INTER_LINEAR)
    return image.astype(np.float32) / 127.5 - 1.0

  def _detect(self, image: np.ndarray) -> list[np.ndarray]:
    found = faces.detect(image)
    if not found:
      raise FileError("no face found")
    small = [f.side for f in found if f.side < self.min_face]
    if small:
      raise FileError(f"face too small ({min(small):.0f} px, at least {self.min_face:.0f} px "
                      f"needed; {len(found)} face(s) found)")
    return [f.quad for f in found]

  def _crops(self, image: np.ndarray, aligned: bool, quads=None) -> tuple[list, list | None]:
    if aligned:
      return [self._aligned_crop(image)], None
    quads = [np.asarray(q) for q in quads] if quads else self._detect(image)
    return [faces.align(image, q, self.size) for q in quads], quads

  def _compose(self, image: np.ndarray, crops: Sequence[np.ndarray], quads) -> np.ndarray:
    if quads is None:
      return to_uint8(crops[0])
    out = image
    for crop, quad in zip(crops, quads):
      out, _ = faces.paste_back(out, crop, quad)
    return out

  def _noise(self, context: bytes) -> list[np.ndarray]:
    return keys.decoder_noise(self.key, context, decoder.noise_shapes(self.size, 1))

  # --- one face ---

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

  def _anonymize_face(self, crop: np.ndarray, context: bytes) -> np.ndarray:
    x = crop[None]
    analysis = self.stages.analyze(x)
    z, bits, noise = self.face_code(np.asarray(analysis["arc_id"][0]), context)
    out = self.stages.anonymize(x, analysis["coeff"], z, bits, noise)
    return np.asarray(out["anon"][0])

  def _hidden_identity(self, crop: np.ndarray, codec: str, layout: str | None,
                       face: int) -> tuple[np.ndarray, np.ndarray]:
    """(identity (512,), extracted bits (512, 32)) of one anonymized crop."""
    extracted = self.stages.extract_identity(crop[None])
    return self.read_payload(np.asarray(extracted["logits"][0]), codec, layout, f"face {face}")

  def read_payload(self, logits: np.ndarray, codec: str, layout: str | None,
                   name: str) -> tuple[np.ndarray, np.ndarray]:
    """Extractor logits (512, 32) -> (identity (512,), hard bits (512, 32)); FileError
    starting with `name` when the payload is missing, damaged or locked with another key."""
    bits = np.asarray(payload.bits_from_logits(logits))
    if codec == "official":
      return np.asarray(payload.decode_identity(bits)), bits
    try:
      decoded = secure_payload.decode(self.key, logits, layout)
    except secure_payload.AuthenticationError:
      raise FileError(f"{name}: wrong key or tampered payload (authentication failed)") from None
    except secure_payload.NoPayloadError:
      raise FileError(f"{name}: no g2face payload found (or damaged beyond repair)") from None
    except secure_payload.PayloadError as e:
      raise FileError(f"{name}: {e}") from None
    return decoded.identity, bits

  # --- photos (arrays) ---

  def anonymize_image(self, image: np.ndarray, aligned: bool = False) -> tuple[np.ndarray, Stamp]:
    """(H, W, 3) uint8 photo -> (anonymized photo, stamp). FileError on a photo without usable faces."""
    crops, quads = self._crops(image, aligned)
    digest = photo_digest(image)
    anons = [self._anonymize_face(c, digest + b"/face%d" % i) for i, c in enumerate(crops)]
    stamp = Stamp(self.codec, self.layout if self.codec == "secure" else None, self.size, aligned,
                  tuple(np.asarray(q).tolist() for q in (quads or ())))
    return self._compose(image, anons, quads), stamp

  def _stamp_or_default(self, stamp: Stamp | None, aligned: bool) -> Stamp:
    if stamp is None:
      return Stamp(self.codec, None, self.size, aligned, ())  # layout None: try every layout
    if stamp.size != self.size:
      raise FileError(f"anonymized with a {stamp.size}-pixel model, the bundle's is {self.size}")
    return stamp

  def hidden_identities(self, image: np.ndarray, stamp: Stamp | None = None,
                        aligned: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per face of an anonymized photo: (identity (512,), extracted bits (512, 32))."""
    stamp = self._stamp_or_default(stamp, aligned)
    crops, _ = self._crops(image, stamp.aligned, stamp.quads)
    return [self._hidden_identity(c, stamp.codec, stamp.layout, i) for i, c in enumerate(crops)]

  def recover_image(self, image: np.ndarray, stamp: Stamp | None = None,
                    aligned: bool = False) -> tuple[np.ndarray, int]:
    """Anonymized (H, W, 3) uint8 photo -> (recovered photo, number of faces). FileError
    when a face's payload is missing, damaged or locked with another key."""
    stamp = self._stamp_or_default(stamp, aligned)
    crops, quads = self._crops(image, stamp.aligned, stamp.quads)
    digest = photo_digest(image)
    recovered = []
    for i, crop in enumerate(crops):
      identity, bits = self._hidden_identity(crop, stamp.codec, stamp.layout, i)
      out = self.stages.restore(crop[None], identity[None], bits[None],
                                self._noise(b"recover/" + digest + b"/face%d" % i))
      recovered.append(np.asarray(out["recovered"][0]))
    return self._compose(image, recovered, quads), len(crops)

  def reference_identity(self, image: np.ndarray, aligned: bool = False) -> np.ndarray:
    """ArcFace identity (512,) of the largest face of a reference photo (or of an aligned crop)."""
    if aligned:
      crop = self._aligned_crop(image)
    else:
      quad = max(self._detect(image), key=lambda q: np.linalg.norm(q[3] - q[0]))
      crop = faces.align(image, quad, self.size)
    return np.asarray(self.stages.analyze(crop[None])["arc_id"][0])

  def verify_image(self, anon: np.ndarray, reference: np.ndarray, stamp: Stamp | None = None,
                   aligned: bool = False) -> list[float]:
    """Cosine between each face's hidden identity and the reference identity."""
    ref = self.reference_identity(reference, aligned)
    return [cosine(identity, ref) for identity, _ in self.hidden_identities(anon, stamp, aligned)]

  # --- files ---

  def anonymize_file(self, src: str, dst: str, aligned: bool = False,
                     video_options=None) -> FileResult:
    """A photo -> PNG, or a video (by content) -> Matroska (`video.Options` apply)."""
    if _is_video(src, aligned):
      from g2face_jax import video
      summary = video.anonymize_video(self, src, dst, video_options or video.Options())
      return FileResult(src, dst, faces=summary["anonymized_tracks"], video=summary)
    if video_options is not None and (video_options.keep or video_options.only):
      raise FileError("--keep / --only are implemented for videos only, not yet for photos")
    image = _read(src)
    out, stamp = self.anonymize_image(image, aligned)
    write_png(dst, out, stamp)
    return FileResult(src, dst, faces=max(len(stamp.quads), 1))

  def recover_file(self, src: str, dst: str, aligned: bool = False,
                   video_options=None) -> FileResult:
    if _is_video(src, aligned):
      from g2face_jax import video
      summary = video.recover_video(self, src, dst, video_options or video.Options())
      return FileResult(src, dst, faces=summary["recovered_tracks"], video=summary)
    out, n_faces = self.recover_image(_read(src), read_stamp(src), aligned)
    write_png(dst, out)
    return FileResult(src, dst, faces=n_faces)

  def verify_file(self, anon: str, reference: str, threshold: float = VERIFY_THRESHOLD,
                  aligned: bool = False) -> FileResult:
    """Is the person hidden in `anon` the person of `reference`? Per-face cosines and
    decisions (cosine >= threshold). FileError messages name the file at fault."""
    def named(path, fn):
      try:
        return fn()
      except FileError as e:
        raise FileError(f"{path}: {e}") from None
    ref = named(reference, lambda: self.reference_identity(_read(reference), aligned))
    hidden = named(anon, lambda: self.hidden_identities(_read(anon), read_stamp(anon), aligned))
    cosines = [cosine(identity, ref) for identity, _ in hidden]
    return FileResult(anon, None, faces=len(cosines), cosines=cosines,
                      match=[c >= threshold for c in cosines])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _is_video(path: str, aligned: bool) -> bool:
  from g2face_jax import video
  if not video.is_video(path):
    return False
  if aligned:
    raise FileError("--aligned takes photos of aligned faces, not videos")
  return True


def _read(path: str) -> np.ndarray:
  try:
    return faces.read_image(path)
  except faces.ImageError as e:
    raise FileError(str(e).removeprefix(f"{path}: ")) from None


# --- batches of files ---

def collect_inputs(paths: Iterable[str]) -> list[tuple[str, str]]:
  """(path, output name) of every input: files as given, folders walked recursively for
  image and video files (sorted); the output name keeps the relative path, with a .png
  suffix (a .mkv suffix for a video, recognized by its content)."""
  from g2face_jax import video

  def output_name(full: str, relative: str) -> str:
    return os.path.splitext(relative)[0] + (video.OUTPUT_SUFFIX if video.is_video(full)
                                            else ".png")
  items = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
          if name.lower().endswith(IMAGE_SUFFIXES + video.VIDEO_SUFFIXES) and \
              not name.startswith("."):
            full = os.path.join(root, name)
            items.append((full, output_name(full, os.path.relpath(full, path))))
    else:
      items.append((path, output_name(path, os.path.basename(path))))
  return items


def check_output_folder(out_dir: str) -> None:
  """Create `out_dir` if needed; FileError (one line) when it cannot be written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as e:
    raise FileError(f"{out_dir}: output folder not writable ({e.strerror or e})") from None


def run_files(step: Callable[[str, str], FileResult], paths: Sequence[str], out_dir: str,
              progress: Callable[[Iterable], Iterable] = iter, debug: bool = False,
              report: Callable[[FileResult], None] = lambda r: None) -> list[FileResult]:
  """Apply `step(src, dst)` to every input; one failure never stops the others.

  Outputs go to out_dir/<name>.png; two inputs with the same output name fail
  the second. Errors become FileResult.error lines naming the file
  (unexpected exceptions too, unless `debug`).
  """
  check_output_folder(out_dir)
  results, taken = [], {}
  for src, name in progress(collect_inputs(paths)):
    dst = os.path.join(out_dir, name)
    try:
      if dst in taken:
        raise FileError(f"output {dst} already written for {taken[dst]}")
      taken[dst] = src
      result = step(src, dst)
    except FileError as e:
      result = FileResult(src, error=f"{src}: {e}")
    except Exception as e:  # one bad file never stops the others
      if debug:
        raise
      result = FileResult(src, error=f"{src}: internal error ({type(e).__name__}: {e})")
    results.append(result)
    report(result)
  return results


def summary(results: Sequence[FileResult]) -> dict:
  """JSON-ready summary of a batch: counts and one record per file."""
  return dict(ok=sum(r.ok for r in results), failed=sum(not r.ok for r in results),
              files=[{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                     for r in results])
