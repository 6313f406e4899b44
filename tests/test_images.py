"""`images`: one reader (orientation, modes, bit depths), one resize, the [-1, 1] range and
PNG writing; the same file gives the model the same input on every road (the photo API's
`--aligned` crops, evaluation, training)."""
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from g2face_jax import config as config_lib
from g2face_jax import faces, files, images, photo, pipeline
from g2face_jax.privacy import keys
from g2face_jax.datasets import pipeline as data_pipeline
from g2face_jax.datasets import sources
from g2face_jax.eval import report

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
GROUP = os.path.join(DATA, "group_photo.jpg")  # 640x320, two faces


def write_png16(path, samples: np.ndarray) -> None:
  """A 16-bit PNG written byte by byte (not by Pillow): (H, W) grey, (H, W, 2) grey+alpha,
  (H, W, 3) RGB or (H, W, 4) RGBA uint16 samples."""
  samples = np.asarray(samples, np.uint16)
  channels = 1 if samples.ndim == 2 else samples.shape[-1]
  colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
  h, w = samples.shape[:2]
  rows = samples.reshape(h, w * channels).astype(">u2")
  raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter 0 on every row

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type,
                                                             0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def group():
  return images.read(GROUP)


@pytest.fixture(scope="module")
def grey(group):
  """The group photo in 8-bit greyscale (ITU-R 601 luma, rounded)."""
  return np.round(group.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


# --- reading ---

def test_16_bit_greyscale_png_of_faces_is_read_as_faces(tmp_path, grey):
  path = str(tmp_path / "grey16.png")
  write_png16(path, grey.astype(np.uint16) * 257)  # 8-bit v -> 16-bit v * 257
  pixels = images.read(path)
  assert pixels.shape == grey.shape + (3,) and pixels.dtype == np.uint8
  np.testing.assert_array_equal(pixels, np.repeat(grey[..., None], 3, axis=-1))
  found = faces.detect(pixels)
  assert len(found) == 2 and all(f.side > faces.MIN_FACE for f in found)


def test_16_bit_colour_pngs_keep_the_high_byte(tmp_path, group):
  wide = group.astype(np.uint16) * 256 + (255 - group)  # the low byte must not leak
  write_png16(str(tmp_path / "rgb16.png"), wide)
  np.testing.assert_array_equal(images.read(str(tmp_path / "rgb16.png")), group)
  alpha = np.full(group.shape[:2] + (1,), 1000, np.uint16)
  write_png16(str(tmp_path / "rgba16.png"), np.concatenate([wide, alpha], -1))
  np.testing.assert_array_equal(images.read(str(tmp_path / "rgba16.png")), group)
  grey16 = wide[..., 1]
  write_png16(str(tmp_path / "la16.png"), np.stack([grey16, alpha[..., 0]], -1))
  np.testing.assert_array_equal(images.read(str(tmp_path / "la16.png")),
                                np.repeat(group[..., 1:2], 3, axis=-1))


def test_modes_are_read_as_rgb(tmp_path, group):
  rgb = np.ascontiguousarray(group[100:164, 100:196])
  index = (np.arange(rgb.shape[0] * rgb.shape[1]) % 7).reshape(rgb.shape[:2]).astype(np.uint8)
  palette = np.arange(7 * 3, dtype=np.uint8).reshape(7, 3) * 11
  p = Image.fromarray(index, mode="P")
  p.putpalette(palette.ravel().tolist())
  p.save(tmp_path / "palette.png")
  p.save(tmp_path / "palette_alpha.png", transparency=2)
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
  Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])).save(tmp_path / "rgba.png")
  Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]])).save(tmp_path / "la.png")  # L + alpha
  Image.fromarray(rgb[..., 0] > 128).save(tmp_path / "bilevel.png")
  cases = {
      "palette.png": palette[index],
      "palette_alpha.png": palette[index],  # colours kept, alpha dropped
      "cmyk.tif": rgb,
      "rgba.png": rgb,
      "la.png": np.repeat(rgb[..., :1], 3, axis=-1),
      "bilevel.png": np.repeat(((rgb[..., :1] > 128) * 255).astype(np.uint8), 3, axis=-1),
  }
  for name, expected in cases.items():
    pixels = images.read(str(tmp_path / name))
    assert pixels.dtype == np.uint8 and pixels.shape == rgb.shape, name
    np.testing.assert_array_equal(pixels, expected, err_msg=name)
  np.testing.assert_array_equal(images.from_array(rgb[..., 0]), cases["la.png"])
  np.testing.assert_array_equal(images.from_array(np.dstack([rgb, rgb[..., :1]])), rgb)


@pytest.mark.parametrize("orientation, stored", [
    (2, lambda a: a[:, ::-1]),           # mirrored left-right
    (3, lambda a: np.rot90(a, 2)),       # upside down
    (6, lambda a: np.rot90(a, 1)),       # display: turn 90 degrees clockwise
    (8, lambda a: np.rot90(a, -1)),      # display: turn 90 degrees counter-clockwise
])
def test_exif_orientation_is_applied(tmp_path, group, orientation, stored):
  upright = np.ascontiguousarray(group[:200, :300])
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / "oriented.png"
  Image.fromarray(np.ascontiguousarray(stored(upright))).save(path, exif=exif)
  np.testing.assert_array_equal(images.read(str(path)), upright)
  np.testing.assert_array_equal(images.decode(path.read_bytes()), upright)


def test_unreadable_inputs_are_one_line_errors(tmp_path):
  text = tmp_path / "notes.jpg"
  text.write_text("not a picture")
  cut = tmp_path / "cut.jpg"
  data = open(GROUP, "rb").read()
  cut.write_bytes(data[:len(data) // 2])
  floats = tmp_path / "float.tif"
  Image.fromarray(np.zeros((4, 4), np.float32)).save(floats)
  for path, message in [(text, "notes.jpg: not an image"),
                        (cut, "cut.jpg: unreadable or truncated"),
                        (tmp_path / "missing.png", "missing.png: no such file"),
                        (tmp_path, f"{tmp_path}: is a folder"),
                        (floats, "float.tif: floating-point pixels")]:
    with pytest.raises(images.ImageError, match=message) as caught:
      images.read(str(path))
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
  with pytest.raises(images.ImageError, match="record 7: not an image"):
    images.decode(b"nothing", "record 7")


# --- resize and range ---

def test_resize_is_antialiased_and_keeps_the_model_size():
  """A 1-pixel checkerboard shrunk 4x averages to mid grey (no aliasing to black/white)."""
  board = np.repeat((np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None], 3, -1)
  small = images.resize(board, 16)
  assert small.shape == (16, 16, 3) and np.abs(small.astype(float) - 127.5).max() < 20
  assert images.resize(board, 64) is board
  flat = np.full((50, 70, 3), 77, np.uint8)
  np.testing.assert_array_equal(images.resize(flat, 32), np.full((32, 32, 3), 77, np.uint8))


def test_unit_range_round_trip_and_official_normalize():
  pixels = np.arange(256, dtype=np.uint8)
  x = images.to_unit(pixels)
  official = (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
  assert x.dtype == np.float32 and x[0] == -1 and x[255] == 1
  np.testing.assert_array_equal(x, official)  # torchvision ToTensor + Normalize(0.5, 0.5)
  np.testing.assert_array_equal(images.to_uint8(x), pixels)
  np.testing.assert_array_equal(images.to_uint8(np.array([-3.0, 0.0, 0.004, 9.0])),
                                [0, 128, 128, 255])  # clipped, rounded half to even
  nhwc = np.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3).astype(np.uint8)
  np.testing.assert_array_equal(images.to_uint8(images.to_unit(nhwc)), nhwc)


# --- writing ---

def test_png_holds_only_the_given_text(tmp_path, group):
  path = str(tmp_path / "sub" / "out.png")
  images.write_png(path, group, {"g2face": '{"a": 1}'})
  with Image.open(path) as im:
    assert im.format == "PNG" and set(im.info) == {"g2face"} and len(im.getexif()) == 0
  assert images.read_text(path, "g2face") == '{"a": 1}' and images.read_text(path, "x") is None
  np.testing.assert_array_equal(images.read(path), group)
  assert os.listdir(tmp_path / "sub") == ["out.png"]  # no temporary file left
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(images.ImageError, match="out.png: output not writable"):
    images.write_png(str(blocker / "out.png"), group)


# --- one file, one model input ---

class _Stop(Exception):
  pass


def _first_model_input(monkeypatch, run) -> np.ndarray:
  """The crops `run()` hands to the pipeline's first stage (analyze), which is not run."""
  seen = []

  def analyze(nets, variables, x, **static):
    seen.append(np.asarray(x))
    raise _Stop

  monkeypatch.setattr(pipeline, "analyze", analyze)
  with pytest.raises(_Stop):
    run()
  monkeypatch.undo()
  return seen[0]


@pytest.mark.parametrize("kind", ["jpeg_rotated", "grey16_png", "palette_png"])
def test_same_file_same_model_input_on_every_road(monkeypatch, tmp_path, bundle_dir, key_file,
                                                  group, grey, kind):
  """A square face crop larger than the model: read and resized alike by `g2face anonymize
  --aligned`, `g2face eval` and the training loader, bit for bit."""
  face = faces.detect(group)[1].quad
  crop = images.to_uint8(faces.align(group, face, 96))  # (96, 96, 3) uint8, S = 32
  folder = tmp_path / "in"
  folder.mkdir()
  if kind == "jpeg_rotated":
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / "face.jpg"
    Image.fromarray(np.ascontiguousarray(np.rot90(crop, 1))).save(path, exif=exif, quality=95)
    with Image.open(path) as im:  # the decoded JPEG, upright, as the reference
      upright = np.asarray(im.convert("RGB").transpose(Image.Transpose.ROTATE_270))
  elif kind == "grey16_png":
    upright = np.repeat(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)
    path = folder / "face.png"
    write_png16(str(path), upright[..., 0].astype(np.uint16) * 257)
  else:
    path = folder / "face.png"
    Image.fromarray(crop).quantize(64).save(path)
    with Image.open(path) as im:
      upright = np.asarray(im.convert("RGB"))
  tool = photo.Anonymizer(bundle_dir, keys.load(key_file))
  size = tool.size
  expected = np.asarray(Image.fromarray(upright).resize((size, size), Image.Resampling.BILINEAR),
                        np.float32) / np.float32(127.5) - np.float32(1)

  photo_input = _first_model_input(monkeypatch, lambda: files.anonymize_file(
      tool, str(path), str(tmp_path / "out.png"), aligned=True))[0]
  eval_input = _first_model_input(monkeypatch, lambda: report.run(
      tool, [str(path)], str(tmp_path / "report")))[0]
  data = config_lib.load("tiny").data.copy_and_resolve_references()
  data.update(flip=False)
  loader = data_pipeline.make_loader(data, sources.open_source(str(folder)), size, 1)
  train_input = next(iter(loader))[0]

  for name, x in [("photo", photo_input), ("eval", eval_input), ("train", train_input)]:
    assert x.dtype == np.float32 and x.shape == (size, size, 3), name
    np.testing.assert_array_equal(x, expected, err_msg=name)
