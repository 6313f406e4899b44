"""Anonymize and recover videos with a `photo.Anonymizer` (its bundle, key, identity
mode and payload codec), through its public API only.

Anonymize, in two passes over the decoded frames:
  1. detect faces (every `detect_every`-th frame), align each detection and
     take its ArcFace identity; link detections into tracks, fill and smooth
     them (`tracking`); hash every frame's pixels (the video's digest).
  2. per track, once: the pooled identity (mean direction of its detections'
     embeddings), and from it the key-driven inputs of `Anonymizer.face_code`:
     z (`consistent`: the key's rotation of the pooled identity; `random`: drawn
     from the key, the video digest and the track number), the hidden bits of the
     pooled identity (the same payload in every frame of the track) and the
     decoder noise. Then every frame's faces are aligned on the track's smoothed
     squares, anonymized in batches through the jitted pipeline, pasted back,
     and the frame is written (`io.Writer`) with its timestamp.
Same key + same video -> the same output frames. The output carries the
tracks' squares (`stamp`) for recovery. Tracks matching a `keep` reference
(or not matching any `only` reference) stay as they are. A track whose median
square is under the tool's `min_face` is obscured in every frame it covers by
the tool's small-face method (`obscure`; 'g2face': the generator anyway), and so
is a track whose median `faces.profile` is over `faces.MAX_PROFILE`; an
obscured track hides nothing, is left out of the stamp and stays as it is on
recovery.

Recover, in two passes over the anonymized video: the extractor reads every
frame of a track, and the track's logits are averaged over its frames before
the payload is decoded (the track hides one payload in every frame, so errors
of single frames average out); then every frame is decoded back to the
recovered identity and pasted, and a lossless video is written. A track whose
payload does not decode (wrong key, damaged) fails the file.

Payload measurement (always after a lossy `crf` output, on request after a
lossless one): the written file is decoded again and the extractor's bits of
every face compared with the hidden bits (`bit_error_rate`) and with the bits
it reads on the exact frames before coding (`bit_flips_from_coding`), and each
track's payload is decoded from its averaged logits (`recoverable_tracks`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Callable, Iterable, Iterator, Sequence

import av
import numpy as np

from g2face_jax import faces, obscure, photo
from g2face_jax.video import io, stamp as stamp_lib, tracking

MATCH_THRESHOLD = photo.MATCH_THRESHOLD  # ArcFace cosine for --keep / --only


@dataclasses.dataclass(frozen=True)
class Options:
  """crf: None for the lossless output, else H.264 at that rate factor; keep_audio: copy
  the first audio stream; detect_every: run the detector on every k-th frame; batch:
  frames per batch (and faces per jitted call); smooth: Savitzky-Golay window (frames);
  max_gap: frames a face may go undetected (scaled up to cover detect_every); measure:
  measure the payload on the output (None: only when lossy); keep / only: reference
  identities (512,) whose tracks are left as they are / the only ones anonymized;
  progress: `progress(desc, total)` -> an object with update(n), set_postfix(**kw), close()."""
  crf: int | None = None
  keep_audio: bool = False
  detect_every: int = 1
  batch: int = 8
  smooth: int = tracking.SMOOTH_WINDOW
  max_gap: int = tracking.MAX_GAP
  measure: bool | None = None
  keep: tuple = ()
  only: tuple = ()
  match_threshold: float = MATCH_THRESHOLD
  progress: Callable | None = None

  def __post_init__(self):
    if self.detect_every < 1 or self.batch < 1:
      raise ValueError("detect_every and batch must be >= 1")
    if self.crf is not None and not 0 <= self.crf <= 51:
      raise ValueError(f"crf must be in 0..51, got {self.crf}")
    if self.keep and self.only:
      raise ValueError("give --keep or --only, not both")

  @property
  def gap(self) -> int:
    return max(self.max_gap, 2 * self.detect_every)


class _NoProgress:
  def update(self, n=1):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


def _progress(opts: Options, desc: str, total: int):
  return opts.progress(desc, total) if opts.progress else _NoProgress()


def _pad(rows: np.ndarray, batch: int) -> np.ndarray:
  return rows if len(rows) == batch else np.concatenate(
      [rows, np.repeat(rows[-1:], batch - len(rows), axis=0)])


def _batched(fn: Callable, batch: int, *columns: np.ndarray) -> list[np.ndarray]:
  """fn(*column slices of `batch` rows, the last padded by repeating its last row) over
  all rows; fn returns a tuple of (batch, ...) arrays; returns them un-padded, joined."""
  n, outs = len(columns[0]), []
  for start in range(0, n, batch):
    part = fn(*[_pad(c[start:start + batch], batch) for c in columns])
    outs.append([np.asarray(p)[:min(batch, n - start)] for p in part])
  return [np.concatenate(col) for col in zip(*outs)]


def _frame_chunks(items: Iterable, batch: int,
                  on_packet: Callable[[av.Packet], None] = lambda p: None) -> Iterator[list]:
  """Frames of an `io.Reader` in lists of `batch`; audio packets go to on_packet."""
  chunk = []
  for item in items:
    if not isinstance(item, io.Frame):
      on_packet(item)
      continue
    chunk.append(item)
    if len(chunk) == batch:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _jobs(chunk: Sequence[io.Frame], tracks: Sequence) -> list[tuple[int, int]]:
  """(position in chunk, track number) of every face to process, frame by frame."""
  return [(k, t) for k, f in enumerate(chunk) for t, track in enumerate(tracks)
          if track.covers(f.index)]


def _crops(tool: photo.Anonymizer, chunk, tracks, jobs) -> np.ndarray:
  return np.stack([tool.align(chunk[k].rgb, tracks[t].quad(chunk[k].index)) for k, t in jobs])


def _paste(chunk, tracks, jobs, crops) -> list[np.ndarray]:
  out = [f.rgb for f in chunk]
  for (k, t), crop in zip(jobs, crops):
    out[k], _ = faces.paste_back(out[k], crop, tracks[t].quad(chunk[k].index))
  return out


def _file_error(e: Exception) -> photo.FileError:
  return photo.FileError(str(e))


# --- pass 1: detection, identities, tracks ---

@dataclasses.dataclass
class Analysis:
  info: io.Info
  frames: int
  digest: bytes           # SHA-256 of every frame's pixels
  tracks: list[tracking.Track]
  warnings: list[str]     # damage, a file cut short
  scores: list[float] = dataclasses.field(default_factory=list)  # per track, mean detector score


def analyze(tool: photo.Anonymizer, path: str, opts: Options = Options()) -> Analysis:
  """Detect, embed and track the faces of the video at `path` (FileError on bad input)."""
  try:
    info = io.probe(path)
    digest = hashlib.sha256(b"g2face/video/v1/")
    runs, pending, n, scores = [], [], 0, {}
    bar = _progress(opts, "detect", info.frames or None)

    to_detect = []

    def embed():
      ids = _batched(lambda x: (tool.identities(x),), opts.batch,
                     np.stack([c for _, c in pending]))[0]
      for (obs, _), e in zip(pending, ids):
        obs.embedding = e
      pending.clear()

    def detect():
      for frame, detected in zip(to_detect, tool.detect_batch([f.rgb for f in to_detect])):
        found = [tracking.Observation(frame.index, f.quad.astype(np.float32), profile=f.profile)
                 for f in detected]
        scores.update((id(o), f.score) for o, f in zip(found, detected))
        pending.extend((o, tool.align(frame.rgb, o.quad)) for o in found)
        runs.append(found)
      to_detect.clear()
      if len(pending) >= opts.batch:
        embed()

    reader = io.Reader(path)
    for frame in reader:
      digest.update(b"%dx%dx3/" % frame.rgb.shape[:2] + frame.rgb.tobytes())
      if frame.index % opts.detect_every == 0:
        to_detect.append(frame)
        if len(to_detect) >= opts.batch:
          detect()
      n += 1
      bar.update(1)
    if to_detect:
      detect()
    if pending:
      embed()
    bar.close()
  except io.VideoError as e:
    raise _file_error(e) from None
  if n == 0:
    raise photo.FileError(reader.damage or "no frames in the video")
  warnings = [w for w in (reader.damage, reader.cut_short) if w]
  if info.frames and info.frames != n:
    warnings.append(f"read {n} of the {info.frames} frames the container declares")
  tracks = tracking.build(runs, n, max_gap=opts.gap, window=opts.smooth)
  track_scores = [float(np.mean([scores[id(o)] for o in t.observations])) for t in tracks]
  return Analysis(info, n, digest.digest(), tracks, warnings, track_scores)


def _decide(tool, track: tracking.Track, opts: Options) -> tuple[str, float | None]:
  """('anonymized', 'obscured' (a small face, `tool.method_for`) or 'kept', best reference
  cosine or None)."""
  kept, best = photo.reference_match(track.pooled_embedding(), opts.keep, opts.only,
                                     opts.match_threshold)
  if kept:
    return "kept", best
  if tool.method_for(track.median_side, track.median_profile) != photo.GENERATOR:
    return "obscured", best
  return "anonymized", best


def _obscure(chunk, tracks, out: list[np.ndarray], method: str) -> list[np.ndarray]:
  """The frames `out` of `chunk` with every face of `tracks` obscured by `method`."""
  out = list(out)
  for k, t in _jobs(chunk, tracks):
    out[k] = obscure.apply(out[k], tracks[t].quad(chunk[k].index), method)
  return out


# --- pass 2: anonymize and write ---

def _anonymize_batch(tool: photo.Anonymizer, x, z, bits, *noise):
  return (tool.anonymize_crops(x, z, bits, noise),)


def _extract_batch(tool: photo.Anonymizer, x):
  return (tool.extract_logits(x),)


def anonymize_video(tool: photo.Anonymizer, src: str, dst: str,
                    opts: Options = Options()) -> dict:
  """Anonymize the video `src` into the Matroska file `dst`; returns the JSON-ready summary.
  FileError (one line) on bad input or an unwritable output; then nothing is written."""
  start = time.perf_counter()
  analysis = analyze(tool, src, opts)
  decisions = [_decide(tool, t, opts) for t in analysis.tracks]
  tracks = [t for t, (d, _) in zip(analysis.tracks, decisions) if d == "anonymized"]
  obscured = [t for t, (d, _) in zip(analysis.tracks, decisions) if d == "obscured"]
  codes = [tool.face_code(t.pooled_embedding(), analysis.digest + b"/track%d" % i)
           for i, t in enumerate(tracks)]
  video_stamp = stamp_lib.VideoStamp(tool.codec, tool.stamp_layout, tool.size, analysis.frames,
                                     tuple(stamp_lib.TrackStamp(t.first, t.quads) for t in tracks))
  measure = opts.crf is not None if opts.measure is None else opts.measure
  exact_bits = []
  try:
    with av.open(src) as template:
      audio = template.streams.audio[0] if opts.keep_audio and template.streams.audio else None
      info = analysis.info
      with io.Writer(dst, info.width, info.height, info.rate, crf=opts.crf, audio=audio,
                     attachment=(stamp_lib.NAME, video_stamp.to_bytes())) as writer:
        bar = _progress(opts, "anonymize", analysis.frames)
        for chunk in _frame_chunks(io.Reader(src, audio=audio is not None), opts.batch,
                                   writer.mux_audio):
          jobs = _jobs(chunk, tracks)
          out = [f.rgb for f in chunk]
          if jobs:
            noise = [np.stack([codes[t][2][layer][0] for _, t in jobs])
                     for layer in range(len(codes[0][2]))]
            anon = _batched(functools.partial(_anonymize_batch, tool), opts.batch,
                            _crops(tool, chunk, tracks, jobs),
                            np.stack([codes[t][0][0] for _, t in jobs]),
                            np.stack([codes[t][1][0] for _, t in jobs]), *noise)[0]
            out = _paste(chunk, tracks, jobs, anon)
          if obscured:  # after the paste, so that no anonymized face covers it again
            out = _obscure(chunk, obscured, out, tool.small_faces)
          if jobs and measure:
            composed = [dataclasses.replace(f, rgb=o) for f, o in zip(chunk, out)]
            exact_bits.append(_batched(functools.partial(_extract_batch, tool), opts.batch,
                                       _crops(tool, composed, tracks, jobs))[0] > 0)
          for f, o in zip(chunk, out):
            writer.write(o, f.pts, f.time_base)
          bar.update(len(chunk))
          bar.set_postfix(faces=len(jobs))
        bar.close()
        if writer.frames != analysis.frames:
          raise photo.FileError(f"the video changed while it was read ({analysis.frames} "
                                f"then {writer.frames} frames)")
  except (io.VideoError, av.FFmpegError) as e:
    raise _file_error(e) from None
  seconds = time.perf_counter() - start
  summary = _summary(analysis, decisions, opts, seconds, tool.small_faces)
  if measure and tracks:
    hidden = [c[1][0] for c in codes]
    summary["payload"] = measure_payload(tool, dst, video_stamp, hidden,
                                         np.concatenate(exact_bits), opts)
  return summary


def _summary(analysis: Analysis, decisions, opts: Options, seconds: float,
             small_faces: str) -> dict:
  info = analysis.info
  anonymized = sum(d == "anonymized" for d, _ in decisions)
  obscured = sum(d == "obscured" for d, _ in decisions)
  methods = dict(anonymized=photo.GENERATOR, obscured=small_faces, kept=None)
  summary = dict(
      frames=analysis.frames, width=info.width, height=info.height,
      frame_rate=str(info.rate) if info.rate else None,
      output_codec="ffv1 (lossless)" if opts.crf is None else f"h264 crf {opts.crf} (lossy)",
      audio=("kept" if opts.keep_audio else "dropped") if info.has_audio else "none",
      tracks=[dict(first=t.first, last=t.last, detected_frames=int(t.detected.sum()),
                   decision=d, median_side=round(float(t.median_side), 1),
                   score=round(score, 4),
                   **({} if methods[d] is None else dict(method=methods[d])),
                   **({} if c is None else dict(reference_cosine=round(c, 4))))
              for t, (d, c), score in zip(analysis.tracks, decisions, analysis.scores)],
      anonymized_tracks=anonymized, obscured_tracks=obscured, seconds=round(seconds, 3),
      frames_per_second=round(analysis.frames / seconds, 3))
  if opts.crf is not None:
    summary["recovery"] = ("may fail: lossy output (--crf); see payload for the bit error rate "
                           "measured on this output")
  if not analysis.tracks:
    summary["note"] = "no face found: the output's frames equal the input's"
  if obscured:
    summary["note"] = (f"{obscured} track(s) of faces too small for G2Face obscured "
                       f"({small_faces}), not recoverable")
  if analysis.warnings:
    summary["warnings"] = analysis.warnings
  return summary


# --- payload reading (recovery and measurement) ---

def _extract(tool, path: str, tracks: Sequence[stamp_lib.TrackStamp], opts: Options,
             desc: str) -> tuple[list[np.ndarray], np.ndarray]:
  """Per track the mean extractor logits (512, 32) over its frames, and every face's
  hard bits (n_faces, 512, 32) bool in job order."""
  sums = [np.zeros((512, 32), np.float64) for _ in tracks]
  counts = [0] * len(tracks)
  bits = []
  bar = _progress(opts, desc, None)
  try:
    for chunk in _frame_chunks(io.Reader(path), opts.batch):
      jobs = _jobs(chunk, tracks)
      if jobs:
        logits = _batched(functools.partial(_extract_batch, tool), opts.batch,
                          _crops(tool, chunk, tracks, jobs))[0]
        for (_, t), lg in zip(jobs, logits):
          sums[t] += lg
          counts[t] += 1
        bits.append(logits > 0)
      bar.update(len(chunk))
  except io.VideoError as e:
    raise _file_error(e) from None
  bar.close()
  return ([s / max(c, 1) for s, c in zip(sums, counts)],
          np.concatenate(bits) if bits else np.zeros((0, 512, 32), bool))


def measure_payload(tool, path: str, video_stamp: stamp_lib.VideoStamp,
                    hidden: Sequence[np.ndarray], exact_bits: np.ndarray,
                    opts: Options = Options()) -> dict:
  """Read the payload back from the written video: bit error rates and per-track decoding."""
  if not tool.has("extractor"):
    return dict(error="the bundle has no extractor: payload not measured")
  mean_logits, bits = _extract(tool, path, video_stamp.tracks, opts, "measure")
  owner = [t for frame in range(video_stamp.frames)
           for t, track in enumerate(video_stamp.tracks) if track.covers(frame)]
  expected = np.stack([hidden[t] > 0.5 for t in owner])
  errors = []
  for i, logits in enumerate(mean_logits):
    try:
      tool.read_payload(logits.astype(np.float32), video_stamp.codec, video_stamp.layout,
                        f"track {i}")
      if video_stamp.codec == "official" and np.any((logits > 0) != (hidden[i] > 0.5)):
        errors.append(f"track {i}: {int(np.sum((logits > 0) != (hidden[i] > 0.5)))} bit errors "
                      "after averaging (the official code has no error correction)")
    except photo.FileError as e:
      errors.append(str(e))
  return dict(bit_error_rate=float(np.mean(bits != expected)),
              bit_flips_from_coding=float(np.mean(bits != exact_bits)),
              averaged_bit_error_rate=float(np.mean([np.mean((lg > 0) != (h > 0.5)) for lg, h
                                                     in zip(mean_logits, hidden)])),
              recoverable_tracks=len(video_stamp.tracks) - len(errors),
              tracks=len(video_stamp.tracks), errors=errors)


# --- recovery ---

def read_stamp(path: str) -> stamp_lib.VideoStamp | None:
  """The g2face data of an anonymized video, None when absent; FileError when damaged."""
  data = io.read_attachment(path, stamp_lib.NAME)
  if data is None:
    return None
  try:
    return stamp_lib.VideoStamp.from_bytes(data)
  except ValueError as e:
    raise photo.FileError(str(e)) from None


def _restore_batch(tool: photo.Anonymizer, anon, identity, bits, *noise):
  return (tool.restore_crops(anon, identity, bits, noise),)


def recover_video(tool: photo.Anonymizer, src: str, dst: str,
                  opts: Options = Options()) -> dict:
  """Recover the faces of the anonymized video `src` into the lossless Matroska `dst`."""
  start = time.perf_counter()
  try:
    info = io.probe(src)
  except io.VideoError as e:
    raise _file_error(e) from None
  video_stamp = read_stamp(src)
  if video_stamp is None:
    raise photo.FileError("no g2face recovery data in the video (not a g2face output, or "
                               "remuxed without its attachment)")
  if video_stamp.size != tool.size:
    raise photo.FileError(f"anonymized with a {video_stamp.size}-pixel model, the "
                          f"bundle's is {tool.size}")
  tracks = video_stamp.tracks
  mean_logits, _ = _extract(tool, src, tracks, opts, "read payload")
  decoded = [tool.read_payload(lg.astype(np.float32), video_stamp.codec, video_stamp.layout,
                               f"track {i}") for i, lg in enumerate(mean_logits)]
  noises = [tool.recover_noise(t.context()) for t in tracks]
  n = 0
  try:
    with av.open(src) as template:
      audio = template.streams.audio[0] if opts.keep_audio and template.streams.audio else None
      with io.Writer(dst, info.width, info.height, info.rate, audio=audio) as writer:
        bar = _progress(opts, "recover", video_stamp.frames)
        reader = io.Reader(src, audio=audio is not None)
        for chunk in _frame_chunks(reader, opts.batch, writer.mux_audio):
          jobs = _jobs(chunk, tracks)
          out = [f.rgb for f in chunk]
          if jobs:
            noise = [np.stack([noises[t][layer][0] for _, t in jobs])
                     for layer in range(len(noises[0]))]
            rec = _batched(functools.partial(_restore_batch, tool), opts.batch,
                           _crops(tool, chunk, tracks, jobs),
                           np.stack([decoded[t][0] for _, t in jobs]),
                           np.stack([decoded[t][1] for _, t in jobs]).astype(np.float32),
                           *noise)[0]
            out = _paste(chunk, tracks, jobs, rec)
          for f, o in zip(chunk, out):
            writer.write(o, f.pts, f.time_base)
          n += len(chunk)
          bar.update(len(chunk))
        bar.close()
  except (io.VideoError, av.FFmpegError) as e:
    raise _file_error(e) from None
  seconds = time.perf_counter() - start
  summary = dict(frames=n, width=info.width, height=info.height,
                 frame_rate=str(info.rate) if info.rate else None,
                 output_codec="ffv1 (lossless)", recovered_tracks=len(tracks),
                 seconds=round(seconds, 3), frames_per_second=round(n / seconds, 3))
  warnings = [w for w in (reader.damage, reader.cut_short) if w]
  if warnings:
    summary["warnings"] = warnings
  return summary
