"""The Grain input pipeline: folders, ArrayRecord shards, the demo set, shuffling,
per-process sharding, flips, resizing and a resumable iterator."""
import numpy as np
import pytest
from PIL import Image

from g2face_jax import config as config_lib
from g2face_jax.datasets import pipeline, prepare, sources, transforms


def _write_folder(root, n=12, size=40):
  rng = np.random.default_rng(0)
  (root / "a" / "b").mkdir(parents=True)
  for i in range(n):
    sub = root / "a" / "b" if i % 3 == 0 else root
    pixels = rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(sub / f"img{i:02d}.{'png' if i % 2 else 'jpg'}")
  (root / "notes.txt").write_text("not an image")
  return root


def _data(**overrides):
  data = config_lib.load("tiny").data.copy_and_resolve_references()
  data.update(overrides)
  return data


def _all(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_folder_is_recursive_and_sorted(tmp_path):
  src = sources.open_source(str(_write_folder(tmp_path)))
  assert len(src) == 12
  assert all(p.endswith((".png", ".jpg")) for p in src.paths) and src.paths == sorted(src.paths)


def test_missing_or_empty_folder_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    sources.open_source(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="no images"):
    sources.open_source(str(tmp_path))


def test_batches_are_resized_in_unit_range_and_seeded(tmp_path):
  src = sources.open_source(str(_write_folder(tmp_path)))
  a = _all(pipeline.make_loader(_data(), src, 16, 4), 3)
  b = _all(pipeline.make_loader(_data(), src, 16, 4), 3)
  c = _all(pipeline.make_loader(_data(shuffle_seed=1), src, 16, 4), 3)
  assert a[0].shape == (4, 16, 16, 3) and a[0].dtype == np.float32
  assert a[0].min() >= -1 and a[0].max() <= 1
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_flip_is_horizontal_and_random(tmp_path):
  src = sources.open_source(str(_write_folder(tmp_path)))
  plain = np.concatenate(_all(pipeline.make_loader(_data(flip=False), src, 16, 4), 3))
  flipped = np.concatenate(_all(pipeline.make_loader(_data(flip=True), src, 16, 4), 3))
  same = [np.array_equal(p, f) for p, f in zip(plain, flipped)]
  mirrored = [np.array_equal(p[:, ::-1], f) for p, f in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored))
  assert any(mirrored) and any(same)


def test_processes_read_disjoint_halves(tmp_path):
  src = sources.open_source(str(_write_folder(tmp_path)))
  whole = np.concatenate(_all(pipeline.make_loader(_data(flip=False), src, 16, 4), 3))
  halves = [np.concatenate(_all(pipeline.make_loader(_data(flip=False), src, 16, 4, p, 2), 3))
            for p in range(2)]
  assert halves[0].shape == (6, 16, 16, 3)
  keys = [{h.tobytes() for h in half} for half in halves]
  assert not keys[0] & keys[1]
  assert len(keys[0] | keys[1]) == 12 == len({w.tobytes() for w in whole})


def test_iterator_state_resumes_exactly(tmp_path):
  src = sources.open_source(str(_write_folder(tmp_path)))
  it = iter(pipeline.make_loader(_data(), src, 16, 4))
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (12 images)
  fresh = iter(pipeline.make_loader(_data(), src, 16, 4))
  fresh.set_state(state)
  assert all(np.array_equal(e, next(fresh)) for e in expected)


def test_prepare_data_round_trips_through_arrayrecord(tmp_path):
  folder = _write_folder(tmp_path / "in")
  paths = prepare.prepare(str(folder), str(tmp_path / "out"), size=16, images_per_shard=5,
                          log=lambda _: None)
  assert len(paths) == 3
  src = sources.open_source(f"arrayrecord:{tmp_path}/out/images-*.array_record")
  assert len(src) == 12
  folder_src = sources.open_source(str(folder))
  for i in (0, 7, 11):
    want = transforms.DecodeResize(16).map(folder_src[i])
    np.testing.assert_array_equal(transforms.DecodeResize(16).map(src[i]), want)


def test_prepare_data_names_a_file_that_is_not_an_image(tmp_path):
  folder = _write_folder(tmp_path / "in")
  (folder / "broken.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="broken.png: not an image"):
    prepare.prepare(str(folder), str(tmp_path / "out"), size=16, log=lambda _: None)


def test_demo_set_is_real_face_crops():
  src = sources.open_source("demo")
  assert len(src) == sources.DEMO_FACES
  image = transforms.DecodeResize(32).map(src[0])
  assert image.shape == (32, 32, 3) and image.std() > 10
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey faces as RGB
  assert pipeline.steps_per_epoch(len(src), 4) == 25
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.steps_per_epoch(3, 4)
