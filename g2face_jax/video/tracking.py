"""Faces across frames: detections linked into tracks, gaps filled, alignment squares
smoothed.

Our own small tracker rather than a library: `norfair` 2.3 pins numpy<2 (this
package needs numpy 2), and the problem is small: a few faces per frame, each
detection an alignment square (quad) from five landmarks, and the whole video
known in advance (files, not a live stream). Linking is frame by frame: each
live track predicts its box at constant velocity, and tracks and detections are
matched by the Hungarian method (scipy) on box IoU (the better of the predicted
and the last seen box), pairs under `min_iou` left apart. A track with no match
for more than `max_gap` frames ends; an unmatched detection starts a track.

Because the whole video is known, a track is then filled offline: frames
between two detections get the linear interpolation of the two quads (a face
the detector misses, or frames skipped by `detect_every`, stays covered), and
the track is held `hold` frames (default max_gap // 2) before its first and
after its last detection (within the video), so a face is covered before the
detector finds it and after it loses it. The quads are then smoothed along time
with a Savitzky-Golay filter (local quadratic fit over `window` frames: no lag,
motion at constant acceleration passes unchanged, detector jitter is averaged
out), so the aligned crop does not jitter. Quads are (4, 2) float (TL, BL, BR, TR), as in `faces`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize, signal

MIN_IOU = 0.3
MAX_GAP = 6      # frames a track may go unseen and still be linked
SMOOTH_WINDOW = 9  # frames; Savitzky-Golay window (odd)
SMOOTH_ORDER = 2


@dataclasses.dataclass
class Observation:
  frame: int
  quad: np.ndarray                 # (4, 2)
  embedding: np.ndarray | None = None  # (512,) ArcFace identity of the detection
  profile: float = 0.0             # how far the face is turned (`faces.profile`)


class FrameSpan:
  """Frames first .. first + len(quads) - 1 of a face, one (4, 2) square per frame
  (the subclass holds `first` and `quads`)."""
  first: int
  quads: np.ndarray

  @property
  def last(self) -> int:
    return self.first + len(self.quads) - 1

  def covers(self, frame: int) -> bool:
    return self.first <= frame <= self.last

  def quad(self, frame: int) -> np.ndarray:
    return self.quads[frame - self.first]


@dataclasses.dataclass
class Track(FrameSpan):
  """One face over consecutive frames first .. first + len(quads) - 1."""
  first: int
  quads: np.ndarray                # (n, 4, 2) float32, filled and smoothed
  detected: np.ndarray             # (n,) bool: a detection was linked at that frame
  observations: list[Observation]


  @property
  def median_side(self) -> float:
    """Median side of the track's squares (pixels)."""
    return float(np.median(np.linalg.norm(self.quads[:, 3] - self.quads[:, 0], axis=-1)))

  @property
  def median_profile(self) -> float:
    """Median `faces.profile` of the track's detections."""
    return float(np.median([o.profile for o in self.observations]))

  def pooled_embedding(self) -> np.ndarray:
    """(512,) mean direction of the detections' embeddings, at their mean norm."""
    e = np.stack([o.embedding for o in self.observations]).astype(np.float64)
    norms = np.linalg.norm(e, axis=-1, keepdims=True)
    direction = (e / np.maximum(norms, 1e-12)).mean(axis=0)
    return (direction / max(np.linalg.norm(direction), 1e-12) * norms.mean()).astype(np.float32)


def box(quad: np.ndarray) -> np.ndarray:
  """(4, 2) quad -> (4,) axis-aligned box x0, y0, x1, y1."""
  quad = np.asarray(quad)
  return np.concatenate([quad.min(axis=0), quad.max(axis=0)])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """IoU of boxes a (N, 4) and b (M, 4) -> (N, M)."""
  a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def _predicted_box(track: list[Observation], frame: int) -> np.ndarray:
  last = box(track[-1].quad)
  if len(track) < 2:
    return last
  prev = box(track[-2].quad)
  velocity = (last - prev) / (track[-1].frame - track[-2].frame)
  return last + velocity * (frame - track[-1].frame)


def link(detections: Sequence[Sequence[Observation]], max_gap: int = MAX_GAP,
         min_iou: float = MIN_IOU) -> list[list[Observation]]:
  """Detections of each detection run (in frame order) -> tracks (lists of observations
  in frame order), ordered by first frame, then left to right."""
  live, done = [], []
  for found in detections:
    if not found:
      continue
    frame = found[0].frame
    ended = [t for t in live if frame - t[-1].frame > max_gap]
    done += ended
    live = [t for t in live if frame - t[-1].frame <= max_gap]
    matched = set()
    if live:
      boxes = np.stack([box(o.quad) for o in found])
      score = np.maximum(iou(np.stack([_predicted_box(t, frame) for t in live]), boxes),
                         iou(np.stack([box(t[-1].quad) for t in live]), boxes))
      rows, cols = optimize.linear_sum_assignment(-score)
      for r, c in zip(rows, cols):
        if score[r, c] >= min_iou:
          live[r].append(found[c])
          matched.add(c)
    live += [[o] for i, o in enumerate(found) if i not in matched]
  done += live
  return sorted(done, key=lambda t: (t[0].frame, t[0].quad[:, 0].mean()))


def smooth(quads: np.ndarray, window: int = SMOOTH_WINDOW,
           order: int = SMOOTH_ORDER) -> np.ndarray:
  """(n, 4, 2) quads -> the same, Savitzky-Golay filtered along n (window shrunk to the
  largest odd length <= n; unchanged when n <= order + 1 or window < 3)."""
  n = len(quads)
  window = min(window, n if n % 2 else n - 1)
  if window < 3 or window <= order:
    return quads
  flat = np.asarray(quads, np.float64).reshape(n, -1)
  return signal.savgol_filter(flat, window, order, axis=0, mode="interp").reshape(quads.shape)


def fill(observations: Sequence[Observation], n_frames: int, hold: int = MAX_GAP // 2,
         window: int = SMOOTH_WINDOW) -> Track:
  """A linked list of observations -> a Track over every frame it covers: linear
  interpolation between detections, `hold` frames held before and after (within
  0 .. n_frames - 1), then smoothed."""
  seen = np.array([o.frame for o in observations])
  first, last = max(seen[0] - hold, 0), min(seen[-1] + hold, n_frames - 1)
  frames = np.arange(first, last + 1)
  corners = np.stack([np.asarray(o.quad, np.float64).ravel() for o in observations])
  dense = np.stack([np.interp(frames, seen, corners[:, k]) for k in range(8)], axis=-1)
  quads = smooth(dense.reshape(-1, 4, 2), window).astype(np.float32)
  detected = np.isin(frames, seen)
  return Track(int(first), quads, detected, list(observations))


def build(detections: Sequence[Sequence[Observation]], n_frames: int, max_gap: int = MAX_GAP,
          hold: int | None = None, window: int = SMOOTH_WINDOW,
          min_iou: float = MIN_IOU) -> list[Track]:
  """Detections per detection run -> filled, smoothed tracks. `hold` defaults to
  max_gap // 2, so that the holds of two tracks of one face (more than max_gap frames
  apart) never overlap."""
  hold = max_gap // 2 if hold is None else hold
  return [fill(t, n_frames, hold, window) for t in link(detections, max_gap, min_iou)]
