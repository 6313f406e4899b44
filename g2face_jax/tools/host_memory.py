"""How glibc's allocator gives XLA's CPU buffers their pages (development tool).

XLA's CPU client takes each run's buffers from `malloc` and frees them after;
glibc returns blocks this large to the kernel and maps fresh ones on the next
request, so every run faults its working set in again, 4 KiB at a time. Two
remedies, both chosen by whoever starts the process:

- huge pages: start the process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  in its environment (glibc 2.35 or later, transparent huge pages in 'always'
  or 'madvise' mode); malloc then asks for 2 MiB pages. `huge_pages_active`
  tells whether this process has them.
- `reuse_freed_memory` (`g2face bench --reuse-freed-memory`) sets glibc's
  allocator (`mallopt`) to keep freed memory for reuse: no faults once the heap
  has settled, but resident memory never shrinks.

docs/benchmarks.md has what each gained.
"""
from __future__ import annotations

import ctypes
import os
import re

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

HEAP_GROWTH_BYTES = 256 << 20  # each heap extension asks the kernel for this much extra

_applied = False

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
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
