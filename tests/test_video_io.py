"""Video files (g2face_jax.video.io): sniffing by content, lossless and lossy writing that
keeps size, frame count, rate and timestamps, attachments, audio copy, damaged inputs."""
import fractions
import os

import av
import numpy as np
import pytest

from g2face_jax.video import io

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GROUP = os.path.join(DATA, "group_photo.jpg")
NTSC = fractions.Fraction(30000, 1001)
TB = fractions.Fraction(1, 90000)


def _frames(n=6, h=36, w=64, seed=0):
  return [np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
          for i in range(n)]


def _pts(n):
  """Variable frame timing in 1/90000 s: NTSC steps, one frame shown twice as long."""
  return [i * 3003 + (3003 if i >= 3 else 0) for i in range(n)]


def _write_input(path, frames, pts, audio=False, metadata=None):
  """An H.264 4:4:4 MP4 (optionally with AAC audio and container metadata)."""
  with av.open(path, "w") as container:
    for k, v in (metadata or {}).items():
      container.metadata[k] = v
    stream = container.add_stream("libx264", rate=NTSC)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt, stream.options = "yuv444p", {"qp": "0"}
    sound = container.add_stream("aac", rate=16000) if audio else None
    for image, p in zip(frames, pts):
      frame = av.VideoFrame.from_ndarray(image, format="rgb24")
      frame.pts, frame.time_base = p, TB
      container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    if sound:
      tone = np.sin(np.arange(8000, dtype=np.float32) / 5)[None] * 0.5
      chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
      chunk.sample_rate, chunk.pts = 16000, 0
      container.mux(sound.encode(chunk))
      container.mux(sound.encode(None))


def _copy(src, dst, **writer_args):
  info = io.probe(src)
  with av.open(src) as template:
    audio = template.streams.audio[0] if writer_args.pop("audio", False) else None
    with io.Writer(dst, info.width, info.height, info.rate, audio=audio, **writer_args) as w:
      for item in io.Reader(src, audio=audio is not None):
        if isinstance(item, io.Frame):
          w.write(item.rgb, item.pts, item.time_base)
        else:
          w.mux_audio(item)


def test_lossless_output_keeps_pixels_count_size_rate_and_timestamps(tmp_path):
  frames, pts = _frames(), _pts(6)
  src, dst = str(tmp_path / "in.mp4"), str(tmp_path / "out.mkv")
  _write_input(src, frames, pts)
  _copy(src, dst, attachment=("data.json", b'{"x": 1}'))
  read = list(io.Reader(dst))
  assert len(read) == 6
  for frame, image, p in zip(read, frames, pts):
    np.testing.assert_array_equal(frame.rgb, list(io.Reader(src))[frame.index].rgb)
    assert abs(frame.time - p / 90000) <= 0.0005 + 1e-9  # Matroska keeps milliseconds
  info = io.probe(dst)
  assert (info.width, info.height, info.codec) == (64, 36, "ffv1")
  # the average rate of these variable-rate frames (7 frame times over 6 frames)
  assert float(io.probe(src).rate) == pytest.approx(float(NTSC) * 6 / 7, rel=1e-6)
  assert float(info.rate) == pytest.approx(float(io.probe(src).rate), rel=2e-3)
  assert io.read_attachment(dst, "data.json") == b'{"x": 1}'
  assert io.read_attachment(dst, "other.json") is None
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".g2face-")]


def test_lossy_output_is_close_but_not_exact(tmp_path):
  frames = [np.full((36, 64, 3), 40 * i, np.uint8) + np.arange(64, dtype=np.uint8)[None, :, None]
            for i in range(4)]
  src, dst = str(tmp_path / "in.mp4"), str(tmp_path / "out.mkv")
  _write_input(src, frames, [i * 3003 for i in range(4)])
  _copy(src, dst, crf=18)
  ref, out = list(io.Reader(src)), list(io.Reader(dst))
  assert len(out) == 4 and io.probe(dst).codec == "h264"
  assert [round(f.time, 3) for f in out] == [round(f.time, 3) for f in ref]
  err = np.mean([np.abs(a.rgb.astype(int) - b.rgb.astype(int)).mean() for a, b in zip(ref, out)])
  assert 0 < err < 3


def test_audio_is_copied_only_when_asked_and_metadata_is_not(tmp_path):
  src = str(tmp_path / "in.mp4")
  _write_input(src, _frames(4), [i * 3003 for i in range(4)], audio=True,
               metadata={"title": "secret title", "comment": "secret place"})
  assert io.probe(src).has_audio
  _copy(src, str(tmp_path / "silent.mkv"))
  _copy(src, str(tmp_path / "sound.mkv"), audio=True)
  assert not io.probe(str(tmp_path / "silent.mkv")).has_audio
  with av.open(str(tmp_path / "sound.mkv")) as c:
    assert c.streams.audio[0].codec_context.name == "aac"
    assert sum(p.size > 0 for p in c.demux(c.streams.audio[0])) > 0
  times = [round(f.time, 3) for f in io.Reader(src)]  # AAC priming does not shift the video
  for name in ("silent.mkv", "sound.mkv"):
    assert [round(f.time, 3) for f in io.Reader(str(tmp_path / name))] == times
  for name in ("silent.mkv", "sound.mkv"):
    assert b"secret" not in open(tmp_path / name, "rb").read()


def test_content_sniffing(tmp_path):
  src = str(tmp_path / "in.mp4")
  _write_input(src, _frames(2), [0, 3003])
  renamed = tmp_path / "clip.dat"
  renamed.write_bytes(open(src, "rb").read())
  (tmp_path / "notes.jpg").write_text("not a picture")
  (tmp_path / "notes.mp4").write_text("not a video")
  assert io.is_video(src) and io.is_video(str(renamed))
  assert not io.is_video(GROUP)  # a still image is a photo, though FFmpeg opens it too
  assert not io.is_video(str(tmp_path / "notes.jpg"))
  assert io.is_video(str(tmp_path / "notes.mp4"))  # a video by name: gets the video error
  with pytest.raises(io.VideoError, match="not a readable video"):
    io.probe(str(tmp_path / "notes.mp4"))


def write_audio_only(path: str) -> str:
  """An MP4 container holding a quarter second of silent AAC and no video stream."""
  with av.open(path, "w", format="mp4") as c:
    s = c.add_stream("aac", rate=16000)
    f = av.AudioFrame.from_ndarray(np.zeros((1, 4000), np.float32), format="fltp", layout="mono")
    f.sample_rate, f.pts = 16000, 0
    c.mux(s.encode(f))
    c.mux(s.encode(None))
  return path


def test_no_video_stream(tmp_path):
  path = write_audio_only(str(tmp_path / "voice.m4a"))
  assert io.is_video(path)
  with pytest.raises(io.VideoError, match="no video stream"):
    io.probe(path)


def test_damaged_and_cut_files_keep_the_frames_before_the_damage(tmp_path):
  frames = _frames(8, seed=3)
  src, good = str(tmp_path / "in.mp4"), str(tmp_path / "good.mkv")
  _write_input(src, frames, [i * 3003 for i in range(8)])
  _copy(src, good)
  data = open(good, "rb").read()
  cut, damaged = tmp_path / "cut.mkv", tmp_path / "damaged.mkv"
  cut.write_bytes(data[:len(data) // 2])
  noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
  damaged.write_bytes(data[:len(data) // 2] + noise + data[len(data) // 2 + 3000:])
  reference = list(io.Reader(good))
  for path in (cut, damaged):
    reader = io.Reader(str(path))
    read = list(reader)
    assert 0 < len(read) < 8
    for a, b in zip(read, reference):
      np.testing.assert_array_equal(a.rgb, b.rgb)
    assert reader.damage or reader.cut_short
  reader = io.Reader(good)
  list(reader)
  assert reader.damage is None and reader.cut_short is None
  front_cut = tmp_path / "cut.mp4"  # MP4 index at the end: nothing readable
  front_cut.write_bytes(open(src, "rb").read()[:2000])
  with pytest.raises(io.VideoError, match="not a readable video"):
    io.probe(str(front_cut))


def test_unwritable_output_leaves_nothing(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(io.VideoError, match="output not writable"):
    io.Writer(str(blocker / "out.mkv"), 64, 36, NTSC)
  with pytest.raises(RuntimeError):
    with io.Writer(str(tmp_path / "out.mkv"), 64, 36, NTSC) as w:
      w.write(_frames(1)[0], 0, TB)
      raise RuntimeError("stop")
  assert os.listdir(tmp_path) == ["file"]
