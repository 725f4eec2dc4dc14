"""Host memory reuse for CPU jobs: glibc's malloc set to keep freed memory for reuse.

XLA:CPU allocates each execution's buffers on its worker threads (1.3 GB of temporaries
per CIFAR10 train step at batch 32). glibc gives each such thread an arena of its own,
too small for requests that large, so it serves them with a fresh `mmap` each and unmaps
them when freed: every step page-faults all of that memory again, about 320k minor faults
and 0.6 s of kernel time per batch-32 step on a 2-core machine, and up to 4 s right after
another program in the process (the PyTorch peer of the benchmarks) has freed memory.

`reuse_freed_memory()` sets glibc's malloc (`mallopt`) to one arena for all threads (the
setting that matters), no `mmap` per large allocation and no trimming, so that the next
step reuses the previous step's buffers: no page faults, and the process keeps its
high-water mark (which a training or evaluation job reaches at every step anyway). Over
the first steps the heap may still grow by a few step-sized blocks (small allocations
settle into freed large ones) before it levels off.

`diffusion_jax.main` calls it before JAX starts when the config's kernel policy may pick
the CPU backend (`model.kernels` auto or native) and `cpu.reuse_host_memory` is on; the
benchmark scripts call it first thing. It only helps before JAX's threads have allocated
(once JAX has computed anything, XLA's threads have arenas of their own and the call
changes nothing for them: it then warns and returns False), and it acts only where it is
meant to:

- hosts without an accelerator, or `JAX_PLATFORMS=cpu` (on GPU and TPU hosts the device
  holds the buffers, and one arena would serialize the input pipeline's allocations);
- glibc's own malloc (not musl, macOS, or an allocator put in front of it with
  `LD_PRELOAD`, such as tcmalloc or jemalloc, which reuse memory by themselves).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

from absl import logging

# mallopt parameters (glibc's malloc.h) and values.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): M_TRIM_THRESHOLD -1 disables trimming


def accelerator_host() -> bool:
  """Whether JAX will run on an accelerator here (a GPU or TPU is visible and
  `JAX_PLATFORMS` does not ask for the CPU)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] != "cpu"
  return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or
              glob.glob("/dev/vfio/[0-9]*"))


def _jax_has_computed() -> bool:
  """Whether JAX's backends are already up (their threads may have arenas of their own)."""
  if "jax" not in sys.modules:
    return False
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def glibc_mallopt():
  """glibc's `mallopt`, if glibc's malloc is the process's malloc; else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  # glibc only
    mallopt = libc.mallopt
    process_malloc = ctypes.CDLL(None).malloc
  except (OSError, AttributeError):
    return None
  address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
  if address(process_malloc) != address(libc.malloc):
    return None  # another allocator (LD_PRELOAD) serves malloc
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep and reuse freed memory (see the module docstring).

  Call it before the first JAX computation.

  Returns:
    True if the settings were applied; False where they do not apply (an accelerator
    host, another malloc) or come too late (JAX has already computed: a warning says so).
  """
  if accelerator_host():
    return False
  mallopt = glibc_mallopt()
  if mallopt is None:
    return False
  if _jax_has_computed():
    logging.warning("host_memory.reuse_freed_memory() was called after JAX started; "
                    "XLA's threads keep their own malloc arenas, so it is left off. Call "
                    "it before the first JAX computation.")
    return False
  results = [mallopt(param, value) for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))]
  ok = all(r == 1 for r in results)
  if not ok:
    logging.warning("glibc's mallopt refused a setting (results %s); host memory may be "
                    "allocated with its defaults.", results)
  return ok
