"""The CPU backend's compiled library: built once per machine, loaded, its FFI targets
registered with JAX.

`csrc/` holds XLA FFI handlers for JAX's CPU backend: oneDNN convolutions (forward with
its bias, and the three gradients in one call; `onednn_conv.cc`), Winograd F(2x2, 3x3)
convolutions over oneDNN's sgemm (`winograd.cc`), GroupNorm(+swish) (`group_norm.cc`) and
dropout (`dropout.cc`). `build` compiles them with g++ against the oneDNN of the
`onednn-cpu-gomp` / `onednn-devel-cpu-gomp` packages and the FFI headers of the installed
jaxlib into a cache folder (a few seconds, once; then loaded). Build-time settings:

- `DIFFUSION_JAX_CACHE`: the cache folder (default `$XDG_CACHE_HOME/diffusion_jax`, i.e.
  `~/.cache/diffusion_jax`).
- `CXX`: the C++ compiler (default `g++`).

They are read when the library is built (when the kernel policy is resolved), never when
a function is traced.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "onednn_conv.cc", CSRC / "winograd.cc", CSRC / "group_norm.cc",
           CSRC / "dropout.cc")
HEADERS = (CSRC / "parallel_for.h", CSRC / "omp_threads.h", CSRC / "winograd.h")
LIBRARY_DIST = "onednn-cpu-gomp"
HEADERS_DIST = "onednn-devel-cpu-gomp"
TARGETS = {  # FFI target name -> symbol in the compiled library
    "diffusion_jax_onednn_conv_forward": "DjOnednnConvForward",
    "diffusion_jax_onednn_conv_backward": "DjOnednnConvBackward",
    "diffusion_jax_group_norm_forward": "DjGroupNormForward",
    "diffusion_jax_group_norm_backward": "DjGroupNormBackward",
    "diffusion_jax_dropout": "DjDropout",
}


class KernelsUnavailable(RuntimeError):
  """The compiled CPU kernels cannot be built or loaded here (the message says why)."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
  """The installed file of distribution `dist` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise KernelsUnavailable(
        f"the package {dist!r} is not installed (pip install {LIBRARY_DIST}==2023.2.0 "
        f"{HEADERS_DIST}==2023.2.0; Linux x86-64 only)") from None
  for f in files:
    if str(f).endswith(suffix):
      path = pathlib.Path(importlib.metadata.distribution(dist).locate_file(f)).resolve()
      if path.exists():
        return path
  raise KernelsUnavailable(f"the package {dist!r} has no file ending in {suffix!r}; "
                           f"reinstall it")


def cache_dir() -> pathlib.Path:
  """The folder that holds the compiled library."""
  if os.environ.get("DIFFUSION_JAX_CACHE"):
    return pathlib.Path(os.environ["DIFFUSION_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "diffusion_jax"


def _cpu_identity() -> bytes:
  """The CPU's model and feature flags (the library is compiled for this CPU's
  instruction set, so a cache folder shared by different machines keeps one per CPU)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features"))]
  except OSError:
    lines = []
  return "".join(sorted(set(lines))).encode()


def build(directory: pathlib.Path | None = None, cxx: str | None = None) -> pathlib.Path:
  """Compiles the FFI handlers (unless already compiled); returns the shared library.

  The file name carries a hash of the sources, the compiler, jaxlib's version, the oneDNN
  library and the CPU (compiled with -march=native), so a change of any of them compiles
  anew. Concurrent processes each compile to a temporary file and rename it into place
  (atomic).

  Raises:
    KernelsUnavailable: packages, headers or compiler missing, or compilation failed.
  """
  directory = cache_dir() if directory is None else pathlib.Path(directory)
  cxx = cxx or os.environ.get("CXX") or "g++"
  compiler = shutil.which(cxx)
  if compiler is None:
    raise KernelsUnavailable(f"no C++ compiler {cxx!r} on PATH (install g++, or set CXX)")
  library = _dist_file(LIBRARY_DIST, "libdnnl.so.3")
  header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
  include = header.parents[2]
  ffi_include = pathlib.Path(jax.ffi.include_dir())
  digest = hashlib.sha256()
  for part in (*(f.read_bytes() for f in SOURCES + HEADERS), compiler.encode(),
               importlib.metadata.version("jaxlib").encode(), str(library).encode(),
               str(ffi_include).encode(), _cpu_identity()):
    digest.update(part)
  target = directory / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
  if target.exists():
    return target
  directory.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  # -fno-trapping-math: GroupNorm's exp vectorizes only without floating-point traps.
  command = [compiler, "-O3", "-march=native", "-fno-trapping-math", "-std=c++17",
             "-shared", "-fPIC", "-fopenmp", "-w", f"-I{ffi_include}", f"-I{include}",
             *(str(f) for f in SOURCES), "-o", tmp,
             str(library), f"-Wl,-rpath,{library.parent}"]
  logging.info("Compiling the CPU kernels: %s", " ".join(command))
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      names = ", ".join(f.name for f in SOURCES)
      raise KernelsUnavailable(f"compiling {names} failed ({' '.join(command)}):\n"
                               f"{result.stderr[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


_state: dict[str, object] = {}


def unavailable_reason() -> str | None:
  """None when the kernels are built, loaded and registered with JAX; else why not.

  The first call builds (if needed) and loads them; the answer is kept for the process.
  """
  if "ok" not in _state:
    try:
      path = build()
      library = ctypes.CDLL(str(path))
      for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
      _state.update(ok=True, library=library, path=path)
    except (KernelsUnavailable, OSError) as e:
      _state.update(ok=False, error=str(e))
  return None if _state["ok"] else str(_state["error"])


def ffi_call(target: str, shapes, *args, **attributes):
  """Calls FFI target `target` of the compiled library (float32 results of `shapes`).

  Batched under vmap one element at a time.

  Raises:
    KernelsUnavailable: the library could not be built or loaded.
  """
  reason = unavailable_reason()
  if reason is not None:
    raise KernelsUnavailable(reason)
  results = tuple(jax.ShapeDtypeStruct(tuple(shape), jnp.float32) for shape in shapes)
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attributes)
