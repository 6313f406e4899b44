"""Files and folders -> per-file results: the road from paths to `photo` or `video`.

`collect_inputs` walks the inputs (folders recursively) for image and video
files; `anonymize_file` / `recover_file` send each to the photo API (a PNG
out, with its stamp) or, when FFmpeg reads it as a video, to `video` (a
Matroska file out); `verify_file` compares an anonymized photo with a
reference photo. `run_files` applies one of them to every input, so that one
bad file never stops the others, and `summary` makes the JSON record of a
batch (for photos, per face the method used, `g2face`, a small-face fallback or
`kept` (--keep / --only), and the detector score). Every failure is a
`FileResult.error` line that names the file.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable, Iterable, Sequence

from g2face_jax import images, photo, video
from g2face_jax.photo import FileError


@dataclasses.dataclass
class FileResult:
  input: str
  output: str | None = None
  faces: int = 0
  error: str | None = None
  cosines: list | None = None  # verify only
  match: list | None = None    # verify only
  video: dict | None = None    # videos only: `video.anonymize_video` / `recover_video` summary
  per_face: list | None = None  # photo anonymize: per face {method, score, side} (`photo`)
  obscured: int | None = None  # photos: faces obscured by a small-face method (not recoverable)
  kept: int | None = None      # photos: faces left as they are (--keep / --only)
  note: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


def _is_video(path: str, aligned: bool) -> bool:
  if not video.is_video(path):
    return False
  if aligned:
    raise FileError("--aligned takes photos of aligned faces, not videos")
  return True


def anonymize_file(tool: photo.Anonymizer, src: str, dst: str, aligned: bool = False,
                   video_options: video.Options | None = None) -> FileResult:
  """A photo -> PNG with its stamp, or a video (by content) -> Matroska. `video.Options`
  apply to videos; its keep / only / match_threshold to photos too. FileError (one line,
  without the input's name) on failure."""
  if _is_video(src, aligned):
    summary = video.anonymize_video(tool, src, dst, video_options or video.Options())
    return FileResult(src, dst, faces=summary["anonymized_tracks"] + summary["obscured_tracks"],
                      obscured=summary["obscured_tracks"] or None, video=summary)
  opts = video_options or video.Options()
  out, stamp, per_face = tool.anonymize_photo(photo.read(src), aligned, keep=opts.keep,
                                              only=opts.only,
                                              match_threshold=opts.match_threshold)
  photo.write(dst, out, stamp)
  obscured, kept = len(stamp.obscured), len(stamp.kept)
  notes = ([f"{obscured} face(s) under {tool.min_face:.0f} px obscured ({tool.small_faces}), "
            "not recoverable"] if obscured else []) + (
      [f"{kept} face(s) kept as they are (--{'keep' if opts.keep else 'only'})"] if kept else [])
  return FileResult(src, dst, faces=len(per_face), per_face=per_face,
                    obscured=obscured or None, kept=kept or None,
                    note="; ".join(notes) or None)


def recover_file(tool: photo.Anonymizer, src: str, dst: str, aligned: bool = False,
                 video_options: video.Options | None = None) -> FileResult:
  """An anonymized photo -> recovered PNG (its stamp, else re-detected faces), or an
  anonymized video -> lossless Matroska."""
  if _is_video(src, aligned):
    summary = video.recover_video(tool, src, dst, video_options or video.Options())
    return FileResult(src, dst, faces=summary["recovered_tracks"], video=summary)
  stamp = photo.read_stamp(src)
  out, n_faces = tool.recover_image(photo.read(src), stamp, aligned)
  photo.write(dst, out)
  obscured = len(stamp.obscured) if stamp is not None else 0
  kept = len(stamp.kept) if stamp is not None else 0
  notes = ([f"{obscured} obscured face(s) skipped: not recoverable"] if obscured else []) + (
      [f"{kept} kept face(s) left as they are"] if kept else [])
  return FileResult(src, dst, faces=n_faces, obscured=obscured or None, kept=kept or None,
                    note="; ".join(notes) or None)


def verify_file(tool: photo.Anonymizer, anon: str, reference: str,
                threshold: float = photo.VERIFY_THRESHOLD, aligned: bool = False) -> FileResult:
  """Is the person hidden in `anon` the person of `reference`? Per-face cosines and
  decisions (cosine >= threshold). FileError messages name the file at fault."""
  def named(path, fn):
    try:
      return fn()
    except FileError as e:
      raise FileError(f"{path}: {e}") from None
  ref = named(reference, lambda: tool.reference_identity(photo.read(reference), aligned))
  hidden = named(anon, lambda: tool.hidden_identities(photo.read(anon), photo.read_stamp(anon),
                                                      aligned))
  cosines = [photo.cosine(identity, ref) for identity, _ in hidden]
  return FileResult(anon, None, faces=len(cosines), cosines=cosines,
                    match=[c >= threshold for c in cosines])


def collect_inputs(paths: Iterable[str]) -> list[tuple[str, str]]:
  """(path, output name) of every input: files as given, folders walked recursively for
  image and video files (sorted); the output name keeps the relative path, with a .png
  suffix (a .mkv suffix for a video, recognized by its content)."""
  def output_name(full: str, relative: str) -> str:
    return os.path.splitext(relative)[0] + (video.OUTPUT_SUFFIX if video.is_video(full)
                                            else ".png")
  items = []
  for path in paths:
    if os.path.isdir(path):
      for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
          if name.lower().endswith(images.SUFFIXES + video.VIDEO_SUFFIXES) and \
              not name.startswith("."):
            full = os.path.join(root, name)
            items.append((full, output_name(full, os.path.relpath(full, path))))
    else:
      items.append((path, output_name(path, os.path.basename(path))))
  return items


def check_output_folder(out_dir: str) -> None:
  """Create `out_dir` if needed; FileError (one line) when it cannot be written."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as e:
    raise FileError(f"{out_dir}: output folder not writable ({e.strerror or e})") from None


def run_files(step: Callable[[str, str], FileResult], paths: Sequence[str], out_dir: str,
              progress: Callable[[Iterable], Iterable] = iter, debug: bool = False,
              report: Callable[[FileResult], None] = lambda r: None) -> list[FileResult]:
  """Apply `step(src, dst)` to every input; one failure never stops the others.

  Outputs go to out_dir/<name> (`collect_inputs`); two inputs with the same
  output name fail the second. Errors become FileResult.error lines naming the
  file (unexpected exceptions too, unless `debug`).
  """
  check_output_folder(out_dir)
  results, taken = [], {}
  for src, name in progress(collect_inputs(paths)):
    dst = os.path.join(out_dir, name)
    try:
      if dst in taken:
        raise FileError(f"output {dst} already written for {taken[dst]}")
      taken[dst] = src
      result = step(src, dst)
    except FileError as e:
      result = FileResult(src, error=f"{src}: {e}")
    except Exception as e:  # one bad file never stops the others
      if debug:
        raise
      result = FileResult(src, error=f"{src}: internal error ({type(e).__name__}: {e})")
    results.append(result)
    report(result)
  return results


def summary(results: Sequence[FileResult]) -> dict:
  """JSON-ready summary of a batch: counts and one record per file."""
  return dict(ok=sum(r.ok for r in results), failed=sum(not r.ok for r in results),
              files=[{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                     for r in results])
