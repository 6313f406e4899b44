"""What an anonymized video carries for its recovery: a JSON Matroska attachment.

Why an attachment: the data is per track (an alignment square for every frame
of the track) and is needed whole before the first frame is recovered; an
attachment holds any amount of bytes, is read without decoding a frame, and
ffmpeg/mkvmerge keep it when remuxing a Matroska file (container tags are
meant for short strings, and a data stream would need a per-frame muxing
scheme for no gain). Nothing in it is secret: the codec, payload layout,
model size, frame count, and per track its first frame and its squares (float32,
little-endian, zlib, base64), exactly as the anonymization used them.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import zlib

import numpy as np

from g2face_jax.video import tracking

NAME = "g2face.json"
FORMAT = "g2face-anonymized-video/1"
CODECS = ("secure", "official")


@dataclasses.dataclass(frozen=True)
class TrackStamp(tracking.FrameSpan):
  first: int
  quads: np.ndarray  # (n, 4, 2) float32

  def context(self) -> bytes:
    """SHA-256 of the track's squares: names the track at recovery (decoder noise)."""
    return hashlib.sha256(b"g2face/video-track/v1/%d/" % self.first
                          + np.ascontiguousarray(self.quads, "<f4").tobytes()).digest()


@dataclasses.dataclass(frozen=True)
class VideoStamp:
  codec: str
  layout: str | None
  size: int
  frames: int
  tracks: tuple[TrackStamp, ...]

  def to_bytes(self) -> bytes:
    tracks = [dict(first=t.first, count=len(t.quads), quads=base64.b64encode(zlib.compress(
        np.ascontiguousarray(t.quads, "<f4").tobytes(), 9)).decode()) for t in self.tracks]
    return json.dumps(dict(format=FORMAT, codec=self.codec, layout=self.layout, size=self.size,
                           frames=self.frames, tracks=tracks)).encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> "VideoStamp":
    try:
      record = json.loads(data)
      if record.get("format") != FORMAT:
        raise ValueError(f"unknown g2face video stamp format {record.get('format')!r}")
      if record["codec"] not in CODECS:
        raise ValueError(f"unknown codec {record['codec']!r}")
      tracks = []
      for t in record["tracks"]:
        quads = np.frombuffer(zlib.decompress(base64.b64decode(t["quads"])), "<f4")
        tracks.append(TrackStamp(int(t["first"]), quads.reshape(int(t["count"]), 4, 2).copy()))
      return cls(record["codec"], record["layout"], int(record["size"]), int(record["frames"]),
                 tuple(tracks))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, zlib.error,
            base64.binascii.Error, AttributeError) as e:
      raise ValueError(f"damaged g2face video stamp ({type(e).__name__})") from None
