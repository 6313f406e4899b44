"""Make a two-face test clip from data/group_photo.jpg: data/two_faces.mp4.

The two people of the photo (left and right halves) move and change size
independently over a fixed textured background: the left one drifts down and
right and grows, the right one drifts up and shrinks. Written as H.264 4:2:0 in
MP4 at 12 frames/s, the way a camera or phone delivers footage. The tests call
`frames` and `write_mp4` at a smaller size; the benchmark clip is the default
640x360, 24 frames:
  python data/make_test_video.py [--width 640 --height 360 --frames 24 --fps 12 --out PATH]
"""
import argparse
import fractions
import os

import av
import cv2
import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTO = os.path.join(HERE, "group_photo.jpg")


def background(width: int, height: int) -> np.ndarray:
  """(height, width, 3) uint8: colour gradients with a fine diagonal pattern."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  r = 60 + 120 * x / width
  g = 80 + 100 * y / height
  b = 140 + 60 * np.sin((x + y) / 6.0)
  return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def frames(width: int = 640, height: int = 360, count: int = 24) -> list[np.ndarray]:
  """`count` (height, width, 3) uint8 RGB frames of the two moving people."""
  with Image.open(PHOTO) as im:
    photo = np.asarray(im.convert("RGB"))
  halves = [photo[:, :320], photo[:, 320:]]
  base = background(width, height)
  unit = width / 640  # the paths below are in 640-wide pixels
  out = []
  for i in range(count):
    t = i / max(count - 1, 1)
    canvas = base.copy()
    # (scale, x, y) of each half's top-left corner, in 640x360 units
    paths = [(0.80 + 0.15 * t, 10 + 40 * t, 0 + 30 * t),
             (0.95 - 0.15 * t, 330 - 20 * t, 40 - 35 * t)]
    for half, (scale, x, y) in zip(halves, paths):
      s = scale * unit
      affine = np.array([[s, 0, x * unit], [0, s, y * unit]], np.float32)
      mask = cv2.warpAffine(np.ones(half.shape[:2], np.float32), affine, (width, height))
      warped = cv2.warpAffine(half, affine, (width, height), flags=cv2.INTER_AREA)
      canvas = np.where(mask[..., None] > 0.999, warped, canvas)
    out.append(canvas)
  return out


def write_mp4(path: str, images: list[np.ndarray], fps: int = 12, crf: int = 18) -> None:
  """H.264 4:2:0 MP4 of (H, W, 3) uint8 RGB frames (even sizes) at `fps`."""
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
    stream.height, stream.width = images[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf)}
    for image in images:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    container.mux(stream.encode(None))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=640)
  parser.add_argument("--height", type=int, default=360)
  parser.add_argument("--frames", type=int, default=24)
  parser.add_argument("--fps", type=int, default=12)
  parser.add_argument("--out", default=os.path.join(HERE, "two_faces.mp4"))
  args = parser.parse_args()
  write_mp4(args.out, frames(args.width, args.height, args.frames), args.fps)


if __name__ == "__main__":
  main()
