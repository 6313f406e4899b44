"""Rebuild data/group_photo.jpg from images that installable packages ship.

Left: the astronaut Eileen Collins (NASA, public domain; `skimage.data.astronaut()`
of scikit-image). Right: Grace Hopper (US Navy, public domain;
`mpl-data/sample_data/grace_hopper.jpg` of matplotlib). Needs scikit-image
and matplotlib (not dependencies of g2face_jax):
  python data/make_group_photo.py
"""
import os

import matplotlib
import numpy as np
import skimage.data
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  astronaut = skimage.data.astronaut()[0:320, 96:416]
  hopper_path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data",
                             "grace_hopper.jpg")
  with Image.open(hopper_path) as im:
    hopper = np.asarray(im.convert("RGB").crop((76, 60, 456, 440)).resize((320, 320),
                                                                          Image.LANCZOS))
  photo = np.concatenate([astronaut, hopper], axis=1)  # (320, 640, 3)
  Image.fromarray(photo).save(os.path.join(HERE, "group_photo.jpg"), quality=92)


if __name__ == "__main__":
  main()
