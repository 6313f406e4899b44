"""Keep freed host memory in the process, so that repeated runs reuse its pages.

XLA's CPU client takes each run's buffers from `malloc` and frees them after. glibc
hands blocks this large back to the kernel (`munmap`) and maps fresh ones on the
next request, so every run of a compiled program faults its whole working set in
again: one paper-config decoder pass at batch 1 takes about 170,000 page faults
and half a second of system time on two cores. `reuse_freed_memory` sets glibc's
allocator (`mallopt`) to keep that memory for reuse. It is opt-in (`g2face bench
--reuse-freed-memory`): the process's resident memory never shrinks, it settles
only after several runs and now and then still grows by a buffer. The README
has what it gained on this project's machine.
"""
from __future__ import annotations

import ctypes

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

HEAP_GROWTH_BYTES = 256 << 20  # each heap extension asks the kernel for this much extra

_applied = False


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
