"""`g2face calibrate`: measure a bundle's payload channel on sample faces, fit the keyed
payload code to it, and calibrate `verify`'s threshold; stored in the bundle's manifest.

Measuring: each sample face (an aligned crop, (S, S, 3) uint8) is anonymized
with a public key (KEY) hiding a `secure_payload` 'uniform' payload (pseudo-random
bits in all 16384 positions), written as an 8-bit PNG and read back ('png');
optionally also through JPEG at a quality ('jpegQ'), and pasted back into a
photo over its first detected face, that photo written as PNG and the face
re-aligned ('paste'). The extractor reads every version. Per condition the
profile holds, per bit position within a value (0 sign, 1-8 exponent, 9-31
mantissa): the bit error rate, the mean |logit|, and the error rates of the
more and of the less confident half of the bits (how well |logit| predicts an
error); the spread of the error rate over faces and over groups of 32 values.

Fitting: `privacy.code_fit.fit` on the signed logits of every condition chooses
the fitted layout (positions, inner code, bits per value) whose face decoding
failure is below the target at the worst condition. The measured error patterns
are then replayed on the chosen layout's payloads (each face's measured signed
logits re-signed for the new bits): the faces that decode are counted.

Verify: the hidden identity a payload carries (the ArcFace identity quantized
as the layout sends it) against the ArcFace identity of the mirrored sample
face (genuine pairs) and of every other sample face (impostor pairs); the
threshold minimizes false accepts + false rejects on the sample (ties: the
higher), with both rates stored. The sample's faces are taken as distinct
people.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from g2face_jax import bundle as bundle_lib
from g2face_jax import faces, images, photo
from g2face_jax.privacy import code_fit, keys, secure_payload

FORMAT = "g2face-calibration/1"
# The key of the calibration payloads: public (they are thrown away), fixed so that runs repeat.
KEY = keys.Key(hashlib.sha256(b"g2face/calibration/v1").digest())
DEMO = "demo"
VALUE_GROUPS = 16  # groups of 512 / 16 = 32 consecutive values, for the spread over values


def sample_faces(data: str, size: int, limit: int | None = None) -> tuple[np.ndarray, str]:
  """(N, size, size, 3) uint8 aligned faces and a description: 'demo' (scikit-image's LFW
  crops, as the training demo set) or a folder of face images (recursive, sorted), each
  resized to the model size as `--aligned` inputs are."""
  from g2face_jax.datasets import sources
  if data == DEMO:
    pixels = list(sources.DemoSource().images)
    what = "the demo faces (scikit-image LFW crops)"
  else:
    paths = sources.list_images(data)
    pixels = [images.read(p) for p in paths[:limit]]
    what = f"{data} ({len(paths)} images)"
  pixels = pixels[:limit]
  if len(pixels) < 2:
    raise ValueError(f"{data}: calibration needs at least 2 faces, found {len(pixels)}")
  return np.stack([images.resize(images.from_array(p), size) for p in pixels]), what


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
  return images.decode(buffer.getvalue(), f"JPEG q{quality}")


def _png(image: np.ndarray) -> np.ndarray:
  return images.decode(images.encode_png(image), "PNG")


def measure(tool: photo.Anonymizer, faces_u8: np.ndarray, jpeg: int | None = None,
            scene: np.ndarray | None = None) -> dict:
  """Anonymize the faces (N, S, S, 3) uint8 with `tool` (its key and 'uniform' layout),
  pass them through each condition and extract: {'bits': (N, 512, 32) hidden bits,
  'logits': {condition: (N, 512, 32)}, 'identities': (N, 512) ArcFace, 'mirrored':
  (N, 512) ArcFace of the mirrored faces}. `scene`: a photo (H, W, 3) uint8 with a face
  to paste into."""
  quad = tool.detect(scene)[0] if scene is not None else None  # FileError: no face
  crops = images.to_unit(faces_u8)
  n = len(crops)
  both = np.concatenate([crops, np.ascontiguousarray(crops[:, :, ::-1])])  # and mirrored
  arc_id, coeff = photo.in_batches(
      lambda c: tuple(tool.stages.analyze(c)[k] for k in ("arc_id", "coeff")), both)
  arc_id, mirrored, coeff = arc_id[:n], arc_id[n:], coeff[:n]
  codes = [tool.face_code(a, b"g2face/calibrate/%d" % i) for i, a in enumerate(arc_id)]
  z, bits = (np.concatenate([c[i] for c in codes]) for i in (0, 1))
  noise = [np.concatenate([c[2][layer] for c in codes]) for layer in range(len(codes[0][2]))]
  anon = photo.in_batches(lambda *a: (tool.stages.anonymize(*a[:4], a[4:])["anon"],),
                          crops, coeff, z, bits, *noise)[0]
  anon_u8 = images.to_uint8(anon)
  versions = {"png": np.stack([_png(a) for a in anon_u8])}
  if jpeg is not None:
    versions[f"jpeg{jpeg}"] = np.stack([_jpeg(a, jpeg) for a in anon_u8])
  if scene is not None:
    pasted = [_png(faces.paste_back(scene, crop, quad)[0]) for crop in anon]
    versions["paste"] = np.stack([images.to_uint8(faces.align(p, quad, tool.size))
                                  for p in pasted])
  logits = {name: photo.in_batches(lambda c: (tool.stages.extract_identity(c)["logits"],),
                                   images.to_unit(v))[0].astype(np.float64)
            for name, v in versions.items()}
  return dict(bits=bits.astype(np.float64), logits=logits, identities=np.asarray(arc_id),
              mirrored=np.asarray(mirrored))


def profile(signed: np.ndarray) -> dict:
  """Signed logits (N, 512, 32) of one condition -> its JSON-ready profile."""
  wrong = (signed < 0) + 0.5 * (signed == 0)
  magnitude = np.abs(signed)
  median = np.median(magnitude, axis=(0, 1), keepdims=True)
  confident = magnitude >= median
  def rate(mask):
    return (np.sum(wrong * mask, axis=(0, 1)) / np.maximum(np.sum(mask, axis=(0, 1)), 1))
  per_face = wrong.mean(axis=(1, 2))
  per_group = wrong.reshape(len(signed), VALUE_GROUPS, -1, 32).mean(axis=(0, 2, 3))
  rounded = lambda a: [round(float(x), 5) for x in np.ravel(a)]  # noqa: E731
  return dict(ber=rounded(wrong.mean(axis=(0, 1))),
              mean_abs_logit=rounded(magnitude.mean(axis=(0, 1))),
              ber_confident=rounded(rate(confident)), ber_unsure=rounded(rate(~confident)),
              face_ber=dict(min=round(float(per_face.min()), 5),
                            median=round(float(np.median(per_face)), 5),
                            max=round(float(per_face.max()), 5)),
              value_group_ber=rounded(per_group))


def replay(key: keys.Key, layout: str, signed: np.ndarray, identities: np.ndarray) -> int:
  """Faces whose measured error pattern (signed logits (N, 512, 32)) lets a payload of
  `layout` decode to its identity: each face's signed logits re-signed for the bits of
  that payload."""
  ok = 0
  for i, (s, identity) in enumerate(zip(signed, identities)):
    bits = secure_payload.encode(key, identity, b"g2face/replay/%d" % i, layout)
    try:
      secure_payload.decode(key, s * (2 * bits - 1), layout)
      ok += 1
    except secure_payload.PayloadError:
      pass
  return ok


def _unit(v: np.ndarray) -> np.ndarray:
  v = np.asarray(v, np.float64)
  return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-30)


def _rates(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> tuple[float, float]:
  return float(np.mean(impostor >= threshold)), float(np.mean(genuine < threshold))


def verify_threshold(hidden: np.ndarray, references: np.ndarray, others: np.ndarray) -> dict:
  """hidden (N, 512) identities the payloads carry, references (N, 512) of the same
  faces (genuine), others (N, 512) of the sample (impostors when j != i) -> the
  threshold minimizing false accepts + false rejects, with the rates there and at
  photo.VERIFY_THRESHOLD."""
  cos = _unit(hidden) @ _unit(others).T
  genuine = np.sum(_unit(hidden) * _unit(references), axis=1)
  impostor = cos[~np.eye(len(cos), dtype=bool)]
  scores = np.unique(np.concatenate([genuine, impostor]))
  best = None
  for t in np.round(np.r_[(scores[1:] + scores[:-1]) / 2, photo.VERIFY_THRESHOLD], 6):
    far, frr = _rates(genuine, impostor, t)
    if best is None or far + frr <= best[1] + best[2]:
      best = (float(t), far, frr)
  far0, frr0 = _rates(genuine, impostor, photo.VERIFY_THRESHOLD)
  return dict(threshold=best[0], false_accept=round(best[1], 4),
              false_reject=round(best[2], 4), genuine_pairs=int(len(genuine)),
              impostor_pairs=int(len(impostor)), default_threshold=photo.VERIFY_THRESHOLD,
              default_false_accept=round(far0, 4), default_false_reject=round(frr0, 4))


def calibrate(tool: photo.Anonymizer, faces_u8: np.ndarray, data: str, jpeg: int | None = None,
              scene: np.ndarray | None = None, target: float = code_fit.TARGET) -> dict:
  """The JSON-ready calibration of `tool`'s bundle on the faces (N, S, S, 3) uint8
  (`measure`, `code_fit.fit`, `replay`, `verify_threshold`)."""
  found = measure(tool, faces_u8, jpeg, scene)
  signed = {name: code_fit.signed_logits(found["bits"], l) for name, l in found["logits"].items()}
  fitted = code_fit.fit(signed, target, found["identities"])
  lay = secure_payload.layout(fitted.best.layout)
  hidden = np.stack([secure_payload.dequantize(secure_payload.quantize(i, lay.value_bits),
                                               lay.value_bits) for i in found["identities"]])
  return dict(format=FORMAT, data=data, faces=int(len(faces_u8)), target=target,
              conditions={name: profile(s) for name, s in signed.items()},
              fit=fitted.as_dict(),
              replay={name: replay(tool.key, fitted.best.layout, s, found["identities"])
                      for name, s in signed.items()},
              verify=verify_threshold(hidden, found["mirrored"], found["identities"]),
              package_version=bundle_lib.package_version())


def store(path: str, calibration: dict) -> None:
  """Write `calibration` into the manifest of the bundle folder at `path`."""
  bundle_lib.update_manifest(path, calibration=calibration)


def of(manifest: dict) -> dict | None:
  """A bundle manifest's calibration, or None (none, or of an unknown format)."""
  found = manifest.get("calibration")
  return found if isinstance(found, dict) and found.get("format") == FORMAT else None


def layout_of(manifest: dict) -> str | None:
  """The payload layout fitted to a bundle (its manifest), or None when not calibrated."""
  found = of(manifest)
  return found["fit"]["layout"] if found else None


def threshold_of(manifest: dict) -> float | None:
  """`verify`'s calibrated cosine threshold of a bundle (its manifest), or None."""
  found = of(manifest)
  return float(found["verify"]["threshold"]) if found else None


def table(calibration: dict) -> str:
  """The calibration as printed by `g2face calibrate`: the per-position profile of every
  condition, the spread, the fitted layout and the verify threshold."""
  names = list(calibration["conditions"])
  c = calibration["conditions"]
  head = ["pos", "kind"] + [f"BER {n}" for n in names] + [
      f"|logit| {names[0]}", f"BER sure {names[0]}", f"BER unsure {names[0]}"]
  rows = []
  for p in range(32):
    kind = "sign" if p == 0 else ("exp" if p <= 8 else "mant")
    rows.append([str(p), kind] + [f"{c[n]['ber'][p]:.4f}" for n in names] + [
        f"{c[names[0]]['mean_abs_logit'][p]:.3g}", f"{c[names[0]]['ber_confident'][p]:.4f}",
        f"{c[names[0]]['ber_unsure'][p]:.4f}"])
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
  line = lambda cells: "  ".join(x.rjust(w) for x, w in zip(cells, widths))  # noqa: E731
  out = [f"calibration on {calibration['faces']} faces from {calibration['data']}",
         line(head)] + [line(r) for r in rows]
  for n in names:
    f, g = c[n]["face_ber"], c[n]["value_group_ber"]
    out.append(f"{n}: bit error rate per face min {f['min']:.4f} median {f['median']:.4f} "
               f"max {f['max']:.4f}; per group of 32 values {min(g):.4f} to {max(g):.4f}")
  fit = calibration["fit"]
  message = ", ".join(f"{q} bits/value {b} bits (cosine >= {fit['cosines'][q]:.4f})"
                      for q, b in fit["message_bits"].items())
  out.append(f"capacity of the worst condition {fit['capacity_bits']:.0f} bits; messages: {message}")
  for cand in fit["candidates"]:
    out.append(f"  best at {cand['value_bits']} bits/value: {cand['layout']} "
               f"({cand['positions']} positions of {cand['groups']} value groups, {cand['inner']} bits per byte): "
               f"face failure <= {cand['failure']:.2e}")
  verdict = "meets" if fit["meets_target"] else "does NOT meet"
  out.append(f"layout {fit['layout']}: face failure <= {fit['failure']:.2e}, {verdict} the "
             f"target {fit['target']:.0e}")
  out.append("replayed measured errors on this layout: " + ", ".join(
      f"{n} {k}/{calibration['faces']} faces decode" for n, k in calibration["replay"].items()))
  v = calibration["verify"]
  out.append(f"verify threshold {v['threshold']:.4f}: false accept {v['false_accept']:.4f}, "
             f"false reject {v['false_reject']:.4f} ({v['genuine_pairs']} genuine pairs: "
             f"mirrored faces; {v['impostor_pairs']} impostor pairs); at the default "
             f"{v['default_threshold']}: {v['default_false_accept']:.4f} / "
             f"{v['default_false_reject']:.4f}")
  return "\n".join(out)
