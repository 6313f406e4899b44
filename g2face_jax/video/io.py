"""Video files through PyAV (FFmpeg): content sniffing, decoding to RGB frames with
their timestamps, and writing a Matroska file atomically.

Reading: any container and codec the wheel's FFmpeg reads; the first video
stream, decoded to (H, W, 3) uint8 RGB (FFmpeg's default YUV -> RGB matrix);
timestamps are the decoder's presentation times. Audio packets come along only
when asked for (they are copied, never decoded).

Writing (always Matroska, `.mkv`):
  lossless  FFV1 (level 3, per-slice CRCs) in 8-bit RGB (`bgr0`): the decoded
            pixels are the written pixels, bit for bit (the default).
  crf N     H.264 (libx264) at constant rate factor N, 4:4:4 chroma: lossy,
            smaller; the hidden payload may not survive.
Each frame keeps its presentation time (Matroska stores milliseconds), the
frame count and size are the input's, and the stream's frame rate is the
input's average rate. No metadata of the input is copied; the only additions
are an optional attachment (g2face's recovery data) and FFmpeg's own muxer
tags (ENCODER, DURATION).
"""
from __future__ import annotations

import dataclasses
import fractions
import os
import tempfile
from typing import Iterator

import av
import numpy as np

from g2face_jax import images

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts",
                  ".wmv", ".flv", ".3gp", ".ogv", ".mts", ".m2ts")
OUTPUT_SUFFIX = ".mkv"
LOSSLESS_CODEC, LOSSLESS_PIX_FMT = "ffv1", "bgr0"
LOSSY_CODEC, LOSSY_PIX_FMT = "libx264", "yuv444p"
ATTACHMENT_MIMETYPE = "application/json"


class VideoError(ValueError):
  """A file that cannot be read or written as a video (one line, without the path)."""


@dataclasses.dataclass(frozen=True)
class Info:
  width: int
  height: int
  rate: fractions.Fraction | None  # average frame rate; None when the container has none
  frames: int                      # frame count the container declares; 0 when unknown
  codec: str
  has_audio: bool


@dataclasses.dataclass
class Frame:
  index: int                      # decode order from 0
  pts: int                        # presentation time in `time_base` units
  time_base: fractions.Fraction
  rgb: np.ndarray                 # (H, W, 3) uint8

  @property
  def time(self) -> float:
    """Presentation time in seconds."""
    return float(self.pts * self.time_base)


def is_video(path: str) -> bool:
  """True when `path` is a video by its content: not a still image Pillow reads, and
  FFmpeg opens it. A file FFmpeg opens without a video stream counts as a (bad) video,
  so that it gets the video error; so does an unreadable file with a video suffix."""
  if not os.path.isfile(path) or images.is_image(path):
    return False
  try:
    with av.open(path) as container:
      return not _still_image_format(container.format.name)
  except (av.FFmpegError, OSError, UnicodeDecodeError):
    return path.lower().endswith(VIDEO_SUFFIXES)


def _still_image_format(name: str) -> bool:
  """FFmpeg's demuxers of single images (it opens them as one-frame videos)."""
  return name.startswith("image2") or name.endswith("_pipe")


def _open(path: str) -> av.container.InputContainer:
  try:
    container = av.open(path)
  except FileNotFoundError:
    raise VideoError("no such file") from None
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f"not a readable video ({_reason(e)})") from None
  if not container.streams.video:
    container.close()
    raise VideoError("no video stream in the file")
  return container


def _reason(e: Exception) -> str:
  return getattr(e, "strerror", None) or str(e) or type(e).__name__


def probe(path: str) -> Info:
  """The first video stream's size, rate and declared frame count. VideoError when the
  file cannot be opened or has no video stream."""
  with _open(path) as container:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    return Info(ctx.width, ctx.height, stream.average_rate or stream.guessed_rate,
                int(stream.frames or 0), ctx.name, bool(container.streams.audio))


class Reader:
  """Iterate over the first video stream: Frames in presentation order, interleaved
  (with `audio`) with the first audio stream's packets as they come.

  Damage does not lose the frames before it: a decoding error ends the iteration
  and `damage` says where; a file cut short just ends, and `cut_short` compares
  the last frame's time with the duration the container declares. Frames
  without a timestamp get index / rate. Opening errors are VideoErrors.
  """

  def __init__(self, path: str, audio: bool = False):
    self.path, self.audio = path, audio
    self.frames = 0
    self.damage: str | None = None
    self._end = 0.0
    self._duration = None
    self._rate = None

  def __iter__(self) -> Iterator[Frame | av.Packet]:
    with _open(self.path) as container:
      video = container.streams.video[0]
      video.thread_type = "AUTO"
      streams = [video] + list(container.streams.audio[:1] if self.audio else ())
      self._rate = video.average_rate or video.guessed_rate or fractions.Fraction(25)
      self._duration = container.duration / 1e6 if container.duration else None
      try:
        for packet in container.demux(*streams):
          if packet.stream.type == "audio":
            if packet.dts is not None:
              yield packet
            continue
          for frame in packet.decode():
            yield self._frame(frame)
      except av.FFmpegError as e:
        self.damage = (f"damaged video: decoding stopped after {self.frames} frame(s) "
                       f"({_reason(e)})")

  def _frame(self, frame: av.VideoFrame) -> Frame:
    if frame.rotation:
      raise VideoError(f"rotated video (display matrix {frame.rotation} degrees) is not "
                       "supported: rotate the pixels first (e.g. ffmpeg -i IN OUT)")
    if frame.pts is None:
      pts, time_base = self.frames, 1 / self._rate
    else:
      pts, time_base = frame.pts, frame.time_base
    out = Frame(self.frames, int(pts), fractions.Fraction(time_base),
                frame.to_ndarray(format="rgb24"))
    self.frames += 1
    self._end = max(self._end, out.time + 1 / self._rate)
    return out

  @property
  def cut_short(self) -> str | None:
    """After iterating: a message when the frames end well before the declared duration."""
    if self._duration and self._end < self._duration - 1.5 / self._rate:
      return (f"video cut short? frames end at {self._end:.3f} s, the container declares "
              f"{self._duration:.3f} s")
    return None


class Writer:
  """An atomically written Matroska video (temporary file renamed on `close`).

  width, height: frame size; rate: the frame rate written in the stream header;
  crf: None for lossless FFV1 RGB, else H.264 at that constant rate factor;
  attachment: (name, bytes) stored as a Matroska attachment; audio: an input audio
  stream whose packets `mux_audio` copies. Use as a context manager: an exception
  inside removes the temporary file and leaves no output.
  """

  def __init__(self, path: str, width: int, height: int, rate: fractions.Fraction | None, *,
               crf: int | None = None, attachment: tuple[str, bytes] | None = None,
               audio: av.audio.stream.AudioStream | None = None):
    self.path = path
    folder = os.path.dirname(os.path.abspath(path))
    try:
      os.makedirs(folder, exist_ok=True)
      fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=".g2face-", suffix=OUTPUT_SUFFIX)
      os.close(fd)
    except OSError as e:
      raise VideoError(f"output not writable ({_reason(e)})") from None
    try:
      # timestamps as given: no shift when copied audio starts before 0 (encoder priming)
      self._container = av.open(self._tmp, "w", format="matroska",
                                container_options={"avoid_negative_ts": "disabled"})
      lossless = crf is None
      stream = self._container.add_stream(LOSSLESS_CODEC if lossless else LOSSY_CODEC,
                                          rate=rate or fractions.Fraction(25))
      stream.width, stream.height = width, height
      stream.pix_fmt = LOSSLESS_PIX_FMT if lossless else LOSSY_PIX_FMT
      stream.options = ({"level": "3", "slicecrc": "1"} if lossless else
                        {"crf": str(int(crf)), "preset": "medium"})
      self._video = stream
      self._audio = self._container.add_stream_from_template(audio) if audio else None
      if attachment:
        self._container.add_attachment(attachment[0], ATTACHMENT_MIMETYPE, attachment[1])
    except BaseException:
      self.abort()
      raise
    self.frames = 0

  def write(self, rgb: np.ndarray, pts: int, time_base: fractions.Fraction) -> None:
    """Encode one (H, W, 3) uint8 RGB frame shown at pts * time_base seconds."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame.pts, frame.time_base = pts, time_base
    if self.frames == 0:
      self._video.codec_context.time_base = time_base
    self._mux(self._video.encode(frame))
    self.frames += 1

  def mux_audio(self, packet: av.Packet) -> None:
    """Copy one audio packet of the template stream (no re-encoding)."""
    packet.stream = self._audio
    self._mux([packet])

  def _mux(self, packets) -> None:
    try:
      self._container.mux(packets)
    except (av.FFmpegError, OSError) as e:
      raise VideoError(f"output not writable ({_reason(e)})") from None

  def close(self) -> None:
    """Flush the encoder, finish the file and move it to `path`."""
    try:
      self._mux(self._video.encode(None))
      self._container.close()
      os.chmod(self._tmp, 0o644)
      os.replace(self._tmp, self.path)
    except OSError as e:
      self.abort()
      raise VideoError(f"output not writable ({_reason(e)})") from None
    except BaseException:
      self.abort()
      raise

  def abort(self) -> None:
    """Drop the temporary file; nothing is written to `path`."""
    container = getattr(self, "_container", None)
    if container is not None:
      try:
        container.close()
      except (av.FFmpegError, OSError):
        pass
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)

  def __enter__(self) -> "Writer":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def read_attachment(path: str, name: str) -> bytes | None:
  """The bytes of the named attachment of a (Matroska) file, or None."""
  try:
    with av.open(path) as container:
      for stream in container.streams.attachments:
        if stream.name == name:
          return bytes(stream.data)
  except (av.FFmpegError, OSError, UnicodeDecodeError):
    return None
  return None
