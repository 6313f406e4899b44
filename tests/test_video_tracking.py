"""Face tracks (g2face_jax.video.tracking): linking, gaps, holds, smoothing."""
import numpy as np
import pytest

from g2face_jax.video import tracking


def _square(cx, cy, side):
  h = side / 2
  return np.array([[cx - h, cy - h], [cx - h, cy + h], [cx + h, cy + h], [cx + h, cy - h]])


def _obs(frame, cx, cy, side=80.0):
  return tracking.Observation(frame, _square(cx, cy, side))


def test_iou_against_hand_computed_values():
  a = np.array([[0, 0, 10, 10]])
  b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
  np.testing.assert_allclose(tracking.iou(a, b), [[50 / 150, 0, 1]])


def test_two_faces_linked_through_misses_and_a_late_face():
  runs = []
  for f in range(20):
    found = []
    if f not in (5, 6, 7):              # face A missed for three frames
      found.append(_obs(f, 100 + 6 * f, 100))
    found.append(_obs(f, 400 - 4 * f, 150 + f))
    if f >= 12:
      found.append(_obs(f, 250, 300, 60))  # face C appears at frame 12
    runs.append(found[::-1])  # any order within a frame
  tracks = tracking.build(runs, 20, max_gap=4, hold=2, window=1)
  assert len(tracks) == 3
  a, b, c = sorted(tracks, key=lambda t: t.observations[0].quad[0, 1])
  a, b = sorted([a, b], key=lambda t: t.observations[0].quad[:, 0].mean())
  assert (a.first, a.last) == (0, 19) and a.detected.sum() == 17
  assert not a.detected[5:8].any()
  # the missed frames are interpolated between frames 4 and 8
  np.testing.assert_allclose(a.quad(6), _square(100 + 36, 100, 80), atol=1e-4)
  assert (b.first, b.last) == (0, 19)
  assert (c.first, c.last) == (10, 19)  # held 2 frames before its first detection
  np.testing.assert_allclose(c.quad(10), _square(250, 300, 60), atol=1e-4)


def test_a_track_ends_after_max_gap_and_is_held():
  runs = [[_obs(f, 100, 100)] for f in range(5)] + [[] for _ in range(10)] + \
         [[_obs(f, 100, 100)] for f in range(15, 20)]
  tracks = tracking.build(runs, 20, max_gap=6, hold=3, window=1)
  assert [(t.first, t.last) for t in tracks] == [(0, 7), (12, 19)]
  tracks = tracking.build(runs, 20, max_gap=11, hold=3, window=1)
  assert [(t.first, t.last) for t in tracks] == [(0, 19)]
  tracks = tracking.build(runs, 20, max_gap=10)  # default hold: 5 frames
  assert [(t.first, t.last) for t in tracks] == [(0, 9), (10, 19)]


def test_crossing_paths_follow_velocity():
  """Two faces of the same size pass each other; constant-velocity prediction keeps
  their identities where the boxes overlap."""
  runs = [[_obs(f, 100 + 20 * f, 200), _obs(f, 500 - 20 * f, 230)] for f in range(0, 21, 2)]
  tracks = tracking.build(runs, 21, max_gap=4, hold=0, window=1)
  assert len(tracks) == 2
  for t in tracks:
    xs = [o.quad[:, 0].mean() for o in t.observations]
    steps = np.diff(xs)
    assert np.all(steps > 0) or np.all(steps < 0)


def test_smoothing_removes_jitter_and_keeps_motion():
  rng = np.random.default_rng(0)
  n = 60
  truth = np.stack([_square(100 + 3 * f + 0.05 * f * f, 120 - 2 * f, 90 + 0.5 * f)
                    for f in range(n)])
  noisy = truth + rng.normal(0, 1.5, truth.shape)
  runs = [[tracking.Observation(f, noisy[f])] for f in range(n)]
  track = tracking.build(runs, n, window=9)[0]
  raw_err = np.sqrt(np.mean((noisy - truth) ** 2))
  err = np.sqrt(np.mean((track.quads - truth) ** 2))
  assert err < 0.6 * raw_err
  # quadratic motion passes a quadratic Savitzky-Golay filter unchanged
  np.testing.assert_allclose(tracking.smooth(truth, 9), truth, atol=1e-6)
  # frame-to-frame jitter (second differences) drops
  jitter = lambda q: np.abs(np.diff(q, 2, axis=0)).mean()
  assert jitter(track.quads) < 0.3 * jitter(noisy)


def test_pooled_embedding_is_the_mean_direction_at_the_mean_norm():
  e = [np.array([3.0, 0, 0]), np.array([0, 1.0, 0])]
  obs = [tracking.Observation(i, _square(0, 0, 10), x) for i, x in enumerate(e)]
  track = tracking.fill(obs, 2, hold=0, window=1)
  expected = np.array([1, 1, 0]) / np.sqrt(2) * 2.0
  np.testing.assert_allclose(track.pooled_embedding(), expected, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_short_tracks_are_not_smoothed_past_their_length(n):
  quads = np.stack([_square(f, f, 50) for f in range(n)])
  out = tracking.smooth(quads, 9)
  np.testing.assert_allclose(out, quads, atol=1e-9)
