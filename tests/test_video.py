"""Videos end to end (g2face_jax.video through `g2face anonymize` / `recover`), on a bundle
of random weights (tiny config) and a two-face clip made from the bundled photo
(the people move and change size; data/make_test_video.py).

As in test_anonymizer, random weights cannot read their own payload: recovery is
checked with the perfect extractor stand-in (the rest of the way back is real),
and the real extractor must fail cleanly.
"""
import hashlib
import importlib.util
import json
import os

import cv2
import jax
import numpy as np
import pytest

from g2face_jax import faces, files, images, models, photo, pipeline
from g2face_jax.privacy import keys
from g2face_jax import video
from g2face_jax.video import anonymize as video_anonymize
from g2face_jax.video import io

from conftest import random_variables
from test_anonymizer import PerfectExtractor, _run
from test_pipeline import _precisions
from test_video_io import write_audio_only

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GROUP = os.path.join(DATA, "group_photo.jpg")
BATCH = "4"


def _clip_maker():
  spec = importlib.util.spec_from_file_location("make_test_video",
                                                os.path.join(DATA, "make_test_video.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """8 frames, 320x180 at 12 frames/s, H.264 4:2:0 MP4, two moving faces."""
  maker = _clip_maker()
  path = str(tmp_path_factory.mktemp("clips") / "two_faces.mp4")
  maker.write_mp4(path, maker.frames(320, 180, 8), fps=12)
  return path


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """The left and the right person of the group photo, one photo each."""
  group = images.read(GROUP)
  folder = tmp_path_factory.mktemp("refs")
  paths = []
  for name, half in (("left", group[:, :320]), ("right", group[:, 320:])):
    paths.append(str(folder / f"{name}.png"))
    images.write_png(paths[-1], half)
  return paths


def _outside(video_stamp, frame, shape, grow=2):
  inside = np.zeros(shape[:2], np.uint8)
  for track in video_stamp.tracks:
    if track.covers(frame):
      cv2.fillPoly(inside, [np.round(track.quad(frame)).astype(np.int32)], 1)
  return cv2.dilate(inside, np.ones((2 * grow + 1,) * 2, np.uint8)) == 0


def _frames(path):
  return list(io.Reader(path))


def _anonymize(capsys, clip, out_dir, bundle_dir, key_file, *extra):
  code, out, err = _run(capsys, "anonymize", clip, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(out_dir), "--batch", BATCH, "--json", *extra)
  assert code == 0, err
  return json.loads(out)["files"][0]


class Recorder:
  """Records what reaches the jitted decoder: z, hidden bits and noise rows per call."""

  def __init__(self, monkeypatch):
    self.calls = []
    real = pipeline.anonymize

    def anonymize(nets, variables, x, coeff, z, hide_bits, noise, **static):
      self.calls.append((np.asarray(z), np.asarray(hide_bits), [np.asarray(n) for n in noise]))
      return real(nets, variables, x, coeff, z, hide_bits, noise, **static)

    monkeypatch.setattr(pipeline, "anonymize", anonymize)


def test_anonymize_and_recover_a_clip_from_the_command_line(capsys, monkeypatch, tmp_path, clip,
                                                            bundle_dir, key_file):
  perfect = PerfectExtractor(monkeypatch)
  restored = []
  real_restore = pipeline.restore

  def restore(nets, variables, anon, identity, hide_bits, noise, **static):
    restored.append(np.asarray(identity))
    return real_restore(nets, variables, anon, identity, hide_bits, noise, **static)

  monkeypatch.setattr(pipeline, "restore", restore)
  result = _anonymize(capsys, clip, tmp_path / "a", bundle_dir, key_file)
  out_path = str(tmp_path / "a" / "two_faces.mkv")
  assert result["output"] == out_path and result["faces"] == 2
  summary = result["video"]
  assert summary["frames"] == 8 and summary["output_codec"] == "ffv1 (lossless)"
  assert [(t["first"], t["last"], t["detected_frames"]) for t in summary["tracks"]] == \
      [(0, 7, 8), (0, 7, 8)]
  assert "recovery" not in summary and "payload" not in summary

  original, anon = _frames(clip), _frames(out_path)
  info_in, info_out = io.probe(clip), io.probe(out_path)
  assert len(anon) == len(original) == 8
  assert (info_out.width, info_out.height) == (info_in.width, info_in.height) == (320, 180)
  assert info_out.rate == info_in.rate == 12
  assert [round(f.time, 3) for f in anon] == [round(f.time, 3) for f in original]
  video_stamp = video_anonymize.read_stamp(out_path)
  assert (video_stamp.codec, video_stamp.size, video_stamp.frames) == ("secure", 32, 8)
  changed = []
  for a, o in zip(anon, original):
    outside = _outside(video_stamp, a.index, a.rgb.shape)
    np.testing.assert_array_equal(a.rgb[outside], o.rgb[outside])  # background kept
    changed.append(np.mean(np.any(a.rgb[~outside] != o.rgb[~outside], axis=-1)))
  assert min(changed) > 0.5

  # same key + same video -> the same frames
  _anonymize(capsys, clip, tmp_path / "again", bundle_dir, key_file)
  for a, b in zip(anon, _frames(str(tmp_path / "again" / "two_faces.mkv"))):
    np.testing.assert_array_equal(a.rgb, b.rgb)

  code, out, err = _run(capsys, "recover", out_path, "--bundle", bundle_dir, "--key", key_file,
                        "--out", str(tmp_path / "rec"), "--batch", BATCH, "--json")
  assert code == 0, err
  rec_path = str(tmp_path / "rec" / "two_faces.mkv")
  assert json.loads(out)["files"][0]["video"]["recovered_tracks"] == 2
  recovered = _frames(rec_path)
  assert len(recovered) == 8 and io.probe(rec_path).rate == 12
  for r, a in zip(recovered, anon):
    outside = _outside(video_stamp, r.index, r.rgb.shape)
    np.testing.assert_array_equal(r.rgb[outside], a.rgb[outside])
    assert np.any(r.rgb[~outside] != a.rgb[~outside])
  # every restored face was decoded back towards its track's pooled identity (int8 payload)
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file))
  pooled = [t.pooled_embedding() for t in video.analyze(tool, clip, video.Options(batch=4)).tracks]
  rows = np.concatenate(restored)[:16]  # 8 frames x 2 tracks, batches of 4, frame by frame
  for i, row in enumerate(rows):
    assert photo.cosine(row, pooled[i % 2]) > 0.999

  # another key: refused, one line, nothing written
  other = str(tmp_path / "other.key")
  keys.write_key_file(other)
  code, out, err = _run(capsys, "recover", out_path, "--bundle", bundle_dir, "--key", other,
                        "--out", str(tmp_path / "wrong"), "--batch", BATCH)
  assert code == 1 and f"FAILED  {out_path}: track 0: wrong key" in out
  assert os.listdir(tmp_path / "wrong") == []
  assert perfect.hidden


def test_one_virtual_identity_per_track(monkeypatch, tmp_path, clip, bundle_dir, key_file):
  """Each track's z, hidden bits and noise are the same in all its frames and differ between
  tracks; the anonymized faces' identity embeddings agree within a track more than between."""
  for mode in ("consistent", "random"):
    recorder = Recorder(monkeypatch)
    tool = photo.Anonymizer(bundle_dir, keys.load(key_file), identity=mode)
    dst = str(tmp_path / f"{mode}.mkv")
    files.anonymize_file(tool, clip, dst, video_options=video.Options(batch=4))
    z = np.concatenate([c[0] for c in recorder.calls])[:16]
    bits = np.concatenate([c[1] for c in recorder.calls])[:16]
    noise = np.concatenate([c[2][-1] for c in recorder.calls])[:16]
    for rows in (z, bits, noise):  # job order: frame by frame, tracks 0 and 1
      for track in (0, 1):
        assert np.all(rows[track::2] == rows[track])
      assert np.any(rows[0] != rows[1])
    analysis = video.analyze(tool, clip, video.Options(batch=4))
    if mode == "consistent":
      expected = keys.consistent_z(tool.key, analysis.tracks[1].pooled_embedding()[None])[0]
    else:
      expected = keys.random_z(tool.key, analysis.digest + b"/track1")
    np.testing.assert_array_equal(z[1], expected)
    digest = hashlib.sha256(b"g2face/video/v1/")
    for f in io.Reader(clip):
      digest.update(b"180x320x3/" + f.rgb.tobytes())
    assert analysis.digest == digest.digest()

  video_stamp = video_anonymize.read_stamp(dst)
  emb = []
  for track in video_stamp.tracks:
    crops = np.stack([faces.align(f.rgb, track.quad(f.index), 32) for f in io.Reader(dst)])
    e = np.asarray(pipeline.analyze(tool.nets, tool.variables, crops)["arc_id"], np.float64)
    emb.append(e / np.linalg.norm(e, axis=1, keepdims=True))
  within = [np.mean((e @ e.T)[np.triu_indices(len(e), 1)]) for e in emb]
  between = np.mean(emb[0] @ emb[1].T)
  assert min(within) > between + 0.2, (within, between)


def test_keep_leaves_the_reference_person_untouched(capsys, tmp_path, clip, bundle_dir, key_file,
                                                    references):
  left, right = references
  result = _anonymize(capsys, clip, tmp_path / "k", bundle_dir, key_file, "--keep", right)
  tracks = result["video"]["tracks"]
  assert [t["decision"] for t in tracks] == ["anonymized", "kept"]
  assert tracks[1]["reference_cosine"] >= 0.3 > tracks[0]["reference_cosine"]
  out_path = str(tmp_path / "k" / "two_faces.mkv")
  video_stamp = video_anonymize.read_stamp(out_path)
  assert len(video_stamp.tracks) == 1
  for a, o in zip(_frames(out_path), _frames(clip)):
    outside = _outside(video_stamp, a.index, a.rgb.shape)
    np.testing.assert_array_equal(a.rgb[outside], o.rgb[outside])  # the kept face included
    assert np.mean(np.any(a.rgb[~outside] != o.rgb[~outside], axis=-1)) > 0.5
    right_half = np.zeros(a.rgb.shape[:2], bool)
    right_half[:, 160:] = True
    np.testing.assert_array_equal(a.rgb[right_half], o.rgb[right_half])
  result = _anonymize(capsys, clip, tmp_path / "o", bundle_dir, key_file, "--only", right)
  assert [t["decision"] for t in result["video"]["tracks"]] == ["kept", "anonymized"]


def test_a_track_too_small_for_the_generator_is_obscured_not_failed(tmp_path, clip, bundle_dir,
                                                                   key_file):
  """A track whose median square is under min_face is obscured (fill: one colour) in every
  frame; the other track is anonymized; the file is written and only the anonymized track
  is in the stamp."""
  from g2face_jax import obscure
  probe = photo.Anonymizer(bundle_dir, keys.load(key_file))
  tracks = video.analyze(probe, clip, video.Options(batch=4)).tracks
  sides = [t.median_side for t in tracks]
  assert len(sides) == 2 and abs(sides[0] - sides[1]) > 2
  small = int(np.argmin(sides))
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file), min_face=float(np.mean(sides)),
                          small_faces="fill")
  dst = str(tmp_path / "small.mkv")
  result = files.anonymize_file(tool, clip, dst, video_options=video.Options(batch=4))
  summary = result.video
  assert [t["decision"] for t in summary["tracks"]] == \
      ["obscured" if i == small else "anonymized" for i in range(2)]
  assert [t["method"] for t in summary["tracks"]] == \
      ["fill" if i == small else "g2face" for i in range(2)]
  assert summary["obscured_tracks"] == 1 and "not recoverable" in summary["note"]
  # each track's score is the mean detector score of its detections (here: every frame's
  # detection nearest to the track's square)
  per_frame = [faces.detect(f.rgb) for f in _frames(clip)]
  for track, record in zip(tracks, summary["tracks"]):
    nearest = [min(found, key=lambda f: np.abs(f.quad - track.quad(i)).sum()).score
               for i, found in enumerate(per_frame)]
    assert record["detected_frames"] == 8
    assert record["score"] == pytest.approx(np.mean(nearest), abs=1e-4)
  video_stamp = video_anonymize.read_stamp(dst)
  assert len(video_stamp.tracks) == 1
  for a, o in zip(_frames(dst), _frames(clip)):
    region = obscure.region_mask(tracks[small].quad(a.index), a.rgb.shape)
    outside = _outside(video_stamp, a.index, a.rgb.shape)
    kept = outside & ~region
    np.testing.assert_array_equal(a.rgb[kept], o.rgb[kept])
    filled = a.rgb[region & outside]
    assert len(np.unique(filled, axis=0)) == 1 and np.any(filled[0] != o.rgb[region & outside])


def test_lossy_output_states_that_recovery_may_fail_with_the_measured_error_rate(
    capsys, tmp_path, clip, bundle_dir, key_file):
  result = _anonymize(capsys, clip, tmp_path / "lossy", bundle_dir, key_file, "--crf", "18")
  summary = result["video"]
  assert summary["output_codec"] == "h264 crf 18 (lossy)"
  assert "may fail" in summary["recovery"]
  payload = summary["payload"]
  # random weights: the extractor reads nothing, about half the bits are wrong
  assert 0.4 < payload["bit_error_rate"] < 0.6
  assert 0 < payload["bit_flips_from_coding"] < 0.5
  assert payload["recoverable_tracks"] == 0 and payload["tracks"] == 2
  assert all("no g2face payload" in e for e in payload["errors"])
  out_path = str(tmp_path / "lossy" / "two_faces.mkv")
  assert io.probe(out_path).codec == "h264" and len(_frames(out_path)) == 8


def test_the_real_extractor_of_random_weights_fails_cleanly(capsys, tmp_path, clip, bundle_dir,
                                                           key_file):
  _anonymize(capsys, clip, tmp_path / "a", bundle_dir, key_file)
  out_path = str(tmp_path / "a" / "two_faces.mkv")
  code, out, _ = _run(capsys, "recover", out_path, "--bundle", bundle_dir, "--key", key_file,
                      "--out", str(tmp_path / "rec"), "--batch", BATCH)
  assert code == 1 and f"{out_path}: track 0: no g2face payload found" in out
  assert os.listdir(tmp_path / "rec") == []
  code, out, _ = _run(capsys, "recover", clip, "--bundle", bundle_dir, "--key", key_file,
                      "--out", str(tmp_path / "rec"))
  assert code == 1 and f"{clip}: no g2face recovery data in the video" in out


def test_bad_video_inputs(capsys, tmp_path, clip, bundle_dir, key_file):
  maker = _clip_maker()
  folder = tmp_path / "in"
  folder.mkdir()
  empty = maker.background(320, 180)
  maker.write_mp4(str(folder / "no_faces.mp4"), [empty] * 3, fps=12)
  (folder / "text.mp4").write_text("not a video")
  # not a video suffix: named on the command line
  voice = write_audio_only(str(tmp_path / "voice.m4a"))
  out_dir = tmp_path / "out"
  (out_dir / "blocked.mkv").mkdir(parents=True)  # a folder where the output should go
  os.symlink(clip, folder / "blocked.mp4")
  code, out, err = _run(capsys, "anonymize", str(folder), voice, "--bundle", bundle_dir, "--key",
                        key_file, "--out", str(out_dir), "--batch", BATCH, "--json")
  assert code == 1
  results = {os.path.basename(r["input"]): r for r in json.loads(out)["files"]}
  assert sorted(results) == ["blocked.mp4", "no_faces.mp4", "text.mp4", "voice.m4a"]
  assert "not a readable video" in results["text.mp4"]["error"]
  assert "no video stream" in results["voice.m4a"]["error"]
  assert "output not writable" in results["blocked.mp4"]["error"]
  for r in results.values():
    if "error" in r:
      assert r["input"] in r["error"] and "\n" not in r["error"] and f"FAILED  {r['error']}" in err
  empty_result = results["no_faces.mp4"]
  assert empty_result["faces"] == 0 and "no face found" in empty_result["video"]["note"]
  for a, o in zip(_frames(str(out_dir / "no_faces.mkv")), _frames(str(folder / "no_faces.mp4"))):
    np.testing.assert_array_equal(a.rgb, o.rgb)
  assert sorted(os.listdir(out_dir)) == ["blocked.mkv", "no_faces.mkv"]


def test_a_cut_video_gives_what_could_be_read(capsys, tmp_path, clip, bundle_dir, key_file):
  """A cut file keeps the frames before the cut; the summary warns."""
  lossless = str(tmp_path / "copy.mkv")
  with io.Writer(lossless, 320, 180, 12) as writer:
    for f in io.Reader(clip):
      writer.write(f.rgb, f.pts, f.time_base)
  data = open(lossless, "rb").read()
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(data[:len(data) * 5 // 8])
  result = _anonymize(capsys, str(cut), tmp_path / "out", bundle_dir, key_file)
  summary = result["video"]
  assert 0 < summary["frames"] < 8 and summary["warnings"]
  out = _frames(str(tmp_path / "out" / "cut.mkv"))
  assert len(out) == summary["frames"] and result["faces"] == 2
  video_stamp = video_anonymize.read_stamp(str(tmp_path / "out" / "cut.mkv"))
  for a, o in zip(out, _frames(clip)):
    outside = _outside(video_stamp, a.index, a.rgb.shape)
    np.testing.assert_array_equal(a.rgb[outside], o.rgb[outside])


def test_track_identities_are_computed_in_full_float32(tiny_config):
  """A track's ArcFace identity is hidden and turned into z: an official output, so its
  matmuls and convolutions run at 'highest' as the pipeline's (lowered for a GPU here)."""
  nets = models.Networks.from_config(tiny_config.model)
  variables = random_variables(tiny_config.model, ("arcface",))
  x = np.zeros((1, tiny_config.model.size, tiny_config.model.size, 3), np.float32)
  with jax.default_matmul_precision(None):  # conftest sets 'highest' for the whole run
    lowered = photo._arcface.trace(nets, variables, x).lower(lowering_platforms=("cuda",))
  precisions = _precisions(lowered.as_text())
  assert len(precisions) > 5 and set(precisions) == {"HIGHEST"}, sorted(set(precisions))
