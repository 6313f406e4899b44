"""How glibc's allocator gives XLA's CPU buffers their pages.

XLA's CPU client takes each run's buffers from `malloc` and frees them after. glibc
hands blocks this large back to the kernel (`munmap`) and maps fresh ones on the
next request, so every run of a compiled program faults its whole working set in
again, 4 KiB at a time: one paper-config decoder pass at batch 1 takes about
170,000 page faults and half a second of system time on two cores. Two remedies:

- huge pages (`relaunch_with_huge_pages`, the `g2face` CLI's default): glibc's
  `glibc.malloc.hugetlb=1` tunable asks for transparent huge pages on what malloc
  maps, so the same buffers fault in 2 MiB at a time (the decoder pass: about
  700 faults) and memory still goes back to the kernel on free. glibc reads
  tunables only when a process starts, hence the relaunch.
- `reuse_freed_memory` (opt-in, `g2face bench --reuse-freed-memory`) sets glibc's
  allocator (`mallopt`) to keep freed memory for reuse: no faults once the heap
  has settled, but resident memory never shrinks and now and then still grows.

The README has what each gained on this project's machine.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

HEAP_GROWTH_BYTES = 256 << 20  # each heap extension asks the kernel for this much extra

_applied = False

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_OPT_OUT = "G2FACE_HUGE_PAGES"  # set to 0 in the environment: no relaunch
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc() -> ctypes.CDLL | None:
  libc = ctypes.CDLL(None)
  try:
    libc.gnu_get_libc_version  # only glibc has it (musl and macOS have no such symbol)
    libc.mallopt
  except AttributeError:
    return None
  return libc


def reuse_freed_memory() -> bool:
  """Make glibc's malloc keep what this process frees (one heap, no memory-mapped
  blocks, no trimming), process-wide from now on.

  True when applied; False where the C library is not glibc (nothing changes).
  """
  global _applied
  libc = _glibc()
  if libc is None:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1),
              (_M_TOP_PAD, HEAP_GROWTH_BYTES))
  accepted = [libc.mallopt(param, value) == 1 for param, value in settings]
  _applied = _applied or all(accepted)
  return all(accepted)


def applied() -> bool:
  """Whether `reuse_freed_memory` has taken effect in this process."""
  return _applied


def _glibc_version() -> tuple[int, int] | None:
  libc = _glibc()
  if libc is None:
    return None
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  major, minor = libc.gnu_get_libc_version().decode().split(".")[:2]
  return int(major), int(minor)


def transparent_huge_pages_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), or
  None where the kernel has none."""
  try:
    with open(path) as f:
      selected = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return selected.group(1) if selected else None


def huge_pages_supported() -> bool:
  """Whether glibc's hugetlb tunable can take effect here: glibc 2.35 or later (the
  first with it) and a kernel that gives huge pages on request."""
  version = _glibc_version()
  return (version is not None and version >= (2, 35)
          and transparent_huge_pages_mode() in ("always", "madvise"))


def huge_pages_requested(environ=None) -> bool:
  """Whether `environ` (default: this process's) asks glibc for huge pages."""
  tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
  return HUGE_PAGES_TUNABLE in tunables.split(":")


def huge_pages_active() -> bool:
  """Whether this process's large buffers get huge pages: the kernel gives them to
  every mapping, or the process started with the tunable and it can take effect."""
  return (transparent_huge_pages_mode() == "always"
          or (huge_pages_requested() and huge_pages_supported()))


def environment_with_huge_pages(environ) -> dict[str, str]:
  """A copy of `environ` whose GLIBC_TUNABLES also asks for huge pages."""
  env = dict(environ)
  if not huge_pages_requested(env):
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"),
                                                  HUGE_PAGES_TUNABLE) if t)
  return env


def relaunch_with_huge_pages() -> None:
  """Start this program again, same arguments, with glibc's huge pages on.

  Returns (doing nothing) where they are already on (`huge_pages_active`), cannot
  take effect here, or the environment sets G2FACE_HUGE_PAGES=0; otherwise
  replaces the process (`os.execve`, same pid, same open files). Call it before
  anything heavy is imported: the relaunch repeats the interpreter's start.
  """
  if (os.environ.get(HUGE_PAGES_OPT_OUT) == "0" or huge_pages_active()
      or not huge_pages_supported()):
    return
  os.execve(sys.executable, sys.orig_argv, environment_with_huge_pages(os.environ))
