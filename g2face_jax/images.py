"""Images in and out: the one reader, the one resize, the model's [-1, 1] range, PNG writing.

Inference (photos, `--aligned` crops), evaluation and training read and resize
through these functions, so the model sees the same pixels from the same file
on every road.

Reading (`read` a file, `decode` bytes, `from_array` an array) gives (H, W, 3)
uint8 RGB: EXIF orientation applied; the first frame of a multi-frame file;
palette, greyscale, bilevel, CMYK (through its embedded ICC profile when it has
one) and YCbCr converted to RGB; alpha dropped, as the official data loader's
`convert("RGB")` does; 16-bit samples (greyscale or RGB PNG, TIFF; 32-bit
integer greyscale is taken as 16-bit) reduced to their high byte, as Pillow
reduces 16-bit RGB. Floating-point images are refused (no known range).
Metadata is not kept. Failures are `ImageError`, one line naming the file.

`resize` takes a whole image to the model's (S, S): PIL's bilinear filter,
which widens its footprint when shrinking (antialiased) and is what the
official training data path (torchvision `Resize` on PIL images) used.

`to_unit` / `to_uint8` convert uint8 [0, 255] <-> float32 [-1, 1] (NHWC, any
leading axes); x / 127.5 - 1 equals the official Normalize((x / 255 - 0.5) /
0.5) bit for bit in float32.

`write_png` writes (H, W, 3) uint8 atomically with only the given text
chunks (the g2face stamps) as metadata; `read_text` reads such a chunk back.
"""
from __future__ import annotations

import io
import os
import tempfile
from typing import Mapping

import numpy as np
from PIL import Image, ImageCms, ImageOps, PngImagePlugin

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNGs in older Pillows


class ImageError(ValueError):
  """An image that cannot be read or written (one line, starting with the file's name)."""


def _rgb(image: Image.Image, name: str) -> np.ndarray:
  """A loaded PIL image -> (H, W, 3) uint8 RGB, orientation applied (see the module doc)."""
  image = ImageOps.exif_transpose(image)
  if image.mode in _SIXTEEN_BIT:
    grey = np.clip(np.asarray(image, np.int64), 0, 65535) >> 8
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
  if image.mode == "F":
    raise ImageError(f"{name}: floating-point pixels are not supported (no known range)")
  if image.mode == "CMYK" and image.info.get("icc_profile"):
    try:
      profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
      image = ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"),
                                        outputMode="RGB")
    except (ImageCms.PyCMSError, OSError):
      pass  # a broken profile: the plain conversion below
  if image.mode == "P" and "transparency" in image.info:
    image = image.convert("RGBA")  # palette transparency: colours kept, alpha dropped below
  return np.array(image.convert("RGB"))


def _open(source, name: str) -> np.ndarray:
  try:
    with Image.open(source) as image:
      image.load()
      return _rgb(image, name)
  except FileNotFoundError:
    raise ImageError(f"{name}: no such file") from None
  except IsADirectoryError:
    raise ImageError(f"{name}: is a folder") from None
  except Image.UnidentifiedImageError:
    raise ImageError(f"{name}: not an image") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    if isinstance(e, ImageError):
      raise
    raise ImageError(f"{name}: unreadable or truncated image ({e})") from None


def read(path: str) -> np.ndarray:
  """The image file at `path` as (H, W, 3) uint8 RGB."""
  return _open(path, path)


def decode(data: bytes, name: str = "image") -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, ...) as (H, W, 3) uint8 RGB; `name` for errors."""
  return _open(io.BytesIO(data), name)


def from_array(pixels: np.ndarray) -> np.ndarray:
  """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8 RGB (alpha dropped)."""
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8:
    raise ImageError(f"image array: uint8 pixels expected, got {pixels.dtype}")
  if pixels.ndim == 2:
    pixels = pixels[..., None]
  if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
    raise ImageError(f"image array: (H, W[, 1|3|4]) expected, got {pixels.shape}")
  if pixels.shape[-1] == 1:
    return np.repeat(pixels, 3, axis=-1)
  return np.ascontiguousarray(pixels[..., :3])


def is_image(path: str) -> bool:
  """True when Pillow recognises the file as an image (by its content, not its name)."""
  try:
    with Image.open(path):
      return True
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return False


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """(H, W, 3) uint8 -> (size, size, 3) uint8 with PIL's antialiased bilinear filter
  (a non-square image is stretched, as the official Resize((size, size)) does)."""
  pixels = np.asarray(pixels, np.uint8)
  if pixels.shape[:2] == (size, size):
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))


def to_unit(pixels: np.ndarray) -> np.ndarray:
  """uint8 (or float 0..255) (..., 3) -> float32 in [-1, 1]: x / 127.5 - 1."""
  return np.asarray(pixels, np.float32) / np.float32(127.5) - np.float32(1)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """float (..., 3) in [-1, 1] (clipped) -> uint8, rounded, as the official code writes images."""
  return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def encode_png(pixels: np.ndarray, text: Mapping[str, str] | None = None) -> bytes:
  """(H, W, 3) uint8 -> PNG bytes holding only `text` as (international) text chunks."""
  info = PngImagePlugin.PngInfo()
  for key, value in (text or {}).items():
    info.add_itxt(key, value)
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG", pnginfo=info)
  return buffer.getvalue()


def write_png(path: str, pixels: np.ndarray, text: Mapping[str, str] | None = None) -> None:
  """Write (H, W, 3) uint8 as a PNG at `path` atomically (temporary file + rename, mode
  0644), with only `text` as metadata; ImageError '<path>: output not writable (...)'."""
  data = encode_png(pixels, text)
  folder = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".g2face-", suffix=".png")
  except OSError as e:
    raise ImageError(f"{path}: output not writable ({e.strerror or e})") from None
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    os.unlink(tmp)
    raise ImageError(f"{path}: output not writable ({e.strerror or e})") from None
  except BaseException:
    os.unlink(tmp)
    raise


def read_text(path: str, key: str) -> str | None:
  """The PNG text chunk `key` of the file at `path`; None when absent or unreadable."""
  try:
    with Image.open(path) as image:
      return getattr(image, "text", {}).get(key)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    return None
