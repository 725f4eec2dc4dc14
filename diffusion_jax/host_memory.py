"""Host memory reuse for long jobs: glibc's malloc set to keep freed memory for reuse.

XLA:CPU allocates each execution's buffers on its worker threads (1.3 GB of temporaries
per CIFAR10 train step at batch 32). glibc serves such large requests from worker threads
with a fresh `mmap` each and unmaps them when freed, so every step page-faults all of that
memory again: about 320k minor faults and 0.6 s of kernel time per batch-32 step on the
2-core development machine, and up to 4 s right after another program in the process
(the PyTorch peer of the benchmarks) has freed memory (`benchmarks/RESULTS.md`).

`reuse_freed_memory()` sets glibc's malloc (`mallopt`) to one arena for all threads, no
`mmap` per large allocation and no returning of freed memory to the system, so that the
next step reuses the previous step's buffers: no page faults, and the process keeps its
high-water mark (which a training or evaluation job reaches at every step anyway).

The entry points (`diffusion_jax.main`, the benchmark scripts) call it first thing; code
that uses the library from its own program may call it before its first JAX computation
(threads that have already allocated keep their own arenas). It does nothing on other C
libraries than glibc, and when `DIFFUSION_JAX_MALLOC=system` is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from absl import logging

MALLOC_ENV = "DIFFUSION_JAX_MALLOC"
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes: the largest value the int parameter takes
_state = {"applied": False}


def applied() -> bool:
  """Whether `reuse_freed_memory` has applied its settings in this process."""
  return _state["applied"]


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module docstring).

  Returns:
    True if the settings were applied; False where `DIFFUSION_JAX_MALLOC=system` asks
    for glibc's defaults or the C library is not glibc.

  Raises:
    ValueError: `DIFFUSION_JAX_MALLOC` has a value other than "reuse" or "system".
  """
  setting = os.environ.get(MALLOC_ENV) or "reuse"
  if setting not in ("reuse", "system"):
    raise ValueError(f"{MALLOC_ENV}={setting!r}; use 'reuse' (keep freed host memory for "
                     f"the next step, the default) or 'system' (glibc's defaults).")
  if setting == "system":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  applied = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
  if not applied:
    logging.warning("glibc's mallopt refused a setting; host memory is allocated with "
                    "its defaults.")
  _state["applied"] = applied
  return applied
