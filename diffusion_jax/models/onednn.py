"""Float32 convolutions on CPU through oneDNN (the library PyTorch's CPU convolutions use).

XLA:CPU's own convolutions (Eigen) are slower than oneDNN's on every shape of the U-Net
(timed alone: 10%-20% on the large maps, up to 3x on strided ones and those with three
channels; `benchmarks/RESULTS.md`), and its YNNPACK convolutions slower still. This
module compiles `diffusion_jax/native/onednn_conv.cc`, two XLA FFI handlers (the
forward with its bias, and the three gradients in one call) over oneDNN, against the
oneDNN of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` packages and the FFI headers of
the installed jaxlib, once per machine into a cache folder (a few seconds; then loaded),
and exposes them as `conv`, a `jax.custom_vjp` of NHWC images, HWIO kernels and a bias
per output channel (added, and its gradient summed, inside oneDNN's own passes: no extra
pass over the output in XLA).

The 3x3 stride-1 convolutions with enough channels and tiles (`conv`'s `algorithm`) are
computed by Winograd's F(2x2, 3x3) instead (`native/winograd.cc`: transforms of 4x4 input
blocks, 16 matrix products over the channels through oneDNN's sgemm, 2.25x fewer
multiplications than the direct convolution; this oneDNN build has no Winograd kernels
of its own). Forward and both gradients up to 2x faster than the direct convolutions on
the U-Net's large maps at batch 8 and 32 (`benchmarks/RESULTS.md`); for finite inputs the
values differ by float32 rounding only (an inf input gives NaN outputs around it, where
the direct convolution gives infs: the transforms subtract inputs).

`available()` says whether the library could be built and loaded; if not (no C++
compiler, packages missing, not Linux x86-64), it logs the reason and the fix once and
`diffusion_jax.models.conv` keeps XLA's convolutions. Environment:

- `DIFFUSION_JAX_CACHE`: the cache folder (default `$XDG_CACHE_HOME/diffusion_jax`, i.e.
  `~/.cache/diffusion_jax`).
- `CXX`: the C++ compiler (default `g++`).
- `DIFFUSION_JAX_WINOGRAD`: 1 (default) or 0 (the direct convolutions for all). Read
  when a function is traced: a function already compiled keeps its choice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Literal

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

NATIVE = pathlib.Path(__file__).resolve().parent.parent / "native"
SOURCE = NATIVE / "onednn_conv.cc"
# Compiled into the same library: the GroupNorm and dropout handlers
# (models/native_norm.py, models/native_dropout.py), which need no oneDNN but share the
# build, the cache and the availability check.
SOURCES = (SOURCE, NATIVE / "winograd.cc", NATIVE / "group_norm.cc", NATIVE / "dropout.cc")
HEADERS = (NATIVE / "parallel_for.h", NATIVE / "omp_threads.h", NATIVE / "winograd.h")
LIBRARY_DIST = "onednn-cpu-gomp"
HEADERS_DIST = "onednn-devel-cpu-gomp"
_TARGETS = {  # FFI target name -> symbol in the compiled library
    "diffusion_jax_onednn_conv_forward": "DjOnednnConvForward",
    "diffusion_jax_onednn_conv_backward": "DjOnednnConvBackward",
    "diffusion_jax_group_norm_forward": "DjGroupNormForward",
    "diffusion_jax_group_norm_backward": "DjGroupNormBackward",
    "diffusion_jax_dropout": "DjDropout",
}
_FORWARD = "diffusion_jax_onednn_conv_forward"
_BACKWARD = "diffusion_jax_onednn_conv_backward"

Padding = tuple[tuple[int, int], tuple[int, int]]


class OnednnUnavailable(RuntimeError):
  """The oneDNN convolutions cannot be built or loaded here (the message says why)."""


def _dist_file(dist: str, suffix: str) -> pathlib.Path:
  """The installed file of distribution `dist` whose path ends with `suffix`."""
  try:
    files = importlib.metadata.files(dist) or []
  except importlib.metadata.PackageNotFoundError:
    raise OnednnUnavailable(
        f"the package {dist!r} is not installed (pip install {LIBRARY_DIST}==2023.2.0 "
        f"{HEADERS_DIST}==2023.2.0; Linux x86-64 only)") from None
  for f in files:
    if str(f).endswith(suffix):
      path = pathlib.Path(importlib.metadata.distribution(dist).locate_file(f)).resolve()
      if path.exists():
        return path
  raise OnednnUnavailable(f"the package {dist!r} has no file ending in {suffix!r}; "
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
    OnednnUnavailable: packages, headers or compiler missing, or compilation failed.
  """
  directory = cache_dir() if directory is None else pathlib.Path(directory)
  cxx = cxx or os.environ.get("CXX") or "g++"
  compiler = shutil.which(cxx)
  if compiler is None:
    raise OnednnUnavailable(f"no C++ compiler {cxx!r} on PATH (install g++, or set CXX)")
  library = _dist_file(LIBRARY_DIST, "libdnnl.so.3")
  header = _dist_file(HEADERS_DIST, "oneapi/dnnl/dnnl.hpp")
  include = header.parents[2]
  ffi_include = pathlib.Path(jax.ffi.include_dir())
  digest = hashlib.sha256()
  for part in (*(f.read_bytes() for f in SOURCES + HEADERS), compiler.encode(),
               importlib.metadata.version("jaxlib").encode(), str(library).encode(),
               str(ffi_include).encode(), _cpu_identity()):
    digest.update(part)
  target = directory / f"onednn_conv-{digest.hexdigest()[:16]}.so"
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
  logging.info("Compiling the oneDNN convolutions: %s", " ".join(command))
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      names = ", ".join(f.name for f in SOURCES)
      raise OnednnUnavailable(f"compiling {names} failed ({' '.join(command)}):\n"
                              f"{result.stderr[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


_state: dict[str, object] = {}


def available() -> bool:
  """Whether the oneDNN convolutions are built, loaded and registered with JAX.

  The first call builds (if needed) and loads them; on failure it logs a warning with the
  reason and the fix once, and every call returns False.
  """
  if "ok" not in _state:
    try:
      path = build()
      library = ctypes.CDLL(str(path))
      for name, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
      _state.update(ok=True, library=library, path=path)
    except (OnednnUnavailable, OSError) as e:
      logging.warning("oneDNN convolutions (and the compiled GroupNorm and dropout "
                      "kernels built with them) unavailable, using XLA's (slower on "
                      "CPU): %s. "
                      "Set DIFFUSION_JAX_CPU_CONV=xla to choose XLA's without this "
                      "warning.", e)
      _state.update(ok=False, error=str(e))
  return bool(_state["ok"])


def _attributes(stride: int, padding: Padding, winograd: bool) -> dict[str, object]:
  (top, bottom), (left, right) = padding
  return dict(stride_h=np.int64(stride), stride_w=np.int64(stride),
              pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right), winograd=bool(winograd))


def _out_size(size: int, low: int, high: int, window: int, stride: int) -> int:
  return (size + low + high - window) // stride + 1


def ffi_call(target: str, shapes, *args, **attributes):
  """Calls FFI target `target` of the compiled library (float32 results of `shapes`).

  Shared by the convolutions here and the GroupNorm and dropout kernels
  (`native_norm`, `native_dropout`); batched under vmap one element at a time.

  Raises:
    OnednnUnavailable: the library could not be built or loaded (see `available`).
  """
  if not available():
    raise OnednnUnavailable(str(_state.get("error")))
  results = tuple(jax.ShapeDtypeStruct(tuple(shape), jnp.float32) for shape in shapes)
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attributes)


def _call(target: str, shapes, *args, stride: int, padding: Padding, winograd: bool):
  return ffi_call(target, shapes, *args, **_attributes(stride, padding, winograd))


Algorithm = Literal["auto", "direct", "winograd"]
_ALGORITHMS = ("auto", "direct", "winograd")
WINOGRAD_ENV = "DIFFUSION_JAX_WINOGRAD"
# Winograd's products are [tiles, Cin] @ [Cin, Cout] (a tile: 2x2 outputs): with fewer
# channels than this on either side (the U-Net's first and last convolutions, 3 or 1 image
# channels) the transforms cost more than the products save.
WINOGRAD_MIN_CHANNELS = 16
# ... and with fewer tiles than these (batch x ceil(H / 2) x ceil(W / 2)) the kernel
# transforms and the small products cost more than they save; the gradients need more
# tiles than the forward (their kernel gradient is a product over the tiles). Timed on
# the U-Net's shapes, 2 cores (`benchmarks/RESULTS.md`, sixth session): the forward
# mostly faster from 16 tiles on (0.8x-1.9x at 16-64 tiles, varying between runs),
# gradients 0.5x-0.9x below 128 tiles, 1.0x-2x from 128 tiles on (no gain on the 4x4 maps
# at 128, 1.6x-2x on the large maps).
WINOGRAD_MIN_TILES_FORWARD = 32
WINOGRAD_MIN_TILES_BACKWARD = 128


def winograd_applies(kernel_shape, stride: int, padding: Padding) -> bool:
  """Whether Winograd's F(2x2, 3x3) computes this convolution: a 3x3 kernel, stride 1,
  one pixel of zero padding on every side (the U-Net's "SAME" 3x3 convolutions)."""
  return (tuple(kernel_shape[:2]) == (3, 3) and stride == 1
          and tuple(map(tuple, padding)) == ((1, 1), (1, 1)))


def winograd_enabled() -> bool:
  """Whether `DIFFUSION_JAX_WINOGRAD` lets "auto" choose Winograd's algorithm (default 1).

  Raises:
    ValueError: the variable is set to something other than 0 or 1.
  """
  env = os.environ.get(WINOGRAD_ENV) or "1"
  if env not in ("0", "1"):
    raise ValueError(f"{WINOGRAD_ENV}={env!r}; use 1 (Winograd's algorithm for the 3x3 "
                     f"convolutions it applies to, the default) or 0 (oneDNN's direct "
                     f"convolution for all).")
  return env == "1"


def _use_winograd(algorithm: str, kernel_shape, stride: int, padding: Padding,
                  x_shape=None, min_tiles: int = 0) -> bool:
  if algorithm not in _ALGORITHMS:
    raise ValueError(f"algorithm={algorithm!r}; use one of {_ALGORITHMS}.")
  applies = winograd_applies(kernel_shape, stride, padding)
  if algorithm == "winograd":
    if not applies:
      raise ValueError(
          f"algorithm='winograd' takes 3x3 kernels, stride 1 and padding ((1, 1), (1, 1)); "
          f"got kernel {tuple(kernel_shape)}, stride {stride}, padding {padding}. Use "
          f"algorithm='direct' (or 'auto') for it.")
    return True
  if algorithm == "direct":
    return False
  enabled = winograd_enabled()
  tiles = x_shape[0] * -(-x_shape[1] // 2) * -(-x_shape[2] // 2) if x_shape else 0
  return (enabled and applies and tiles >= min_tiles and
          min(kernel_shape[2], kernel_shape[3]) >= WINOGRAD_MIN_CHANNELS)


def _check(name: str, *arrays: jax.Array) -> None:
  for a in arrays:
    if a.dtype != jnp.float32 or a.ndim != 4:
      raise ValueError(f"onednn.{name} takes 4-d float32 arrays; got {a.dtype} "
                       f"{tuple(a.shape)}.")


def _bias_or_zeros(bias: jax.Array | None, kernel: jax.Array) -> jax.Array:
  if bias is None:
    return jnp.zeros(kernel.shape[-1:], jnp.float32)
  if bias.dtype != jnp.float32 or bias.shape != kernel.shape[-1:]:
    raise ValueError(f"onednn: the bias must be float32 [{kernel.shape[-1]}] (the "
                     f"kernel's output channels); got {bias.dtype} {tuple(bias.shape)}.")
  return bias


def conv_forward(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
                 bias: jax.Array | None = None, algorithm: Algorithm = "auto") -> jax.Array:
  """y = conv(x, kernel) + bias: x [B, H, W, Cin], kernel [KH, KW, Cin, Cout], bias [Cout]
  (None: zero) -> [B, H', W', Cout]; `algorithm` as in `conv`."""
  _check("conv_forward", x, kernel)
  winograd = _use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                           WINOGRAD_MIN_TILES_FORWARD)
  (top, bottom), (left, right) = padding
  shape = (x.shape[0], _out_size(x.shape[1], top, bottom, kernel.shape[0], stride),
           _out_size(x.shape[2], left, right, kernel.shape[1], stride), kernel.shape[3])
  return _call(_FORWARD, [shape], x, kernel, _bias_or_zeros(bias, kernel), stride=stride,
               padding=padding, winograd=winograd)[0]


def conv_backward(x: jax.Array, kernel: jax.Array, g: jax.Array, stride: int,
                  padding: Padding, algorithm: Algorithm = "auto"
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The three gradients of `conv_forward` for the output cotangent g [B, H', W', Cout].

  `algorithm` as in `conv`, with the gradients' tile threshold
  (`WINOGRAD_MIN_TILES_BACKWARD`) for "auto".

  Returns:
    (dx [B, H, W, Cin], dkernel [KH, KW, Cin, Cout], dbias [Cout]); dkernel[i, j] = sum
    over batch and output positions p of x_pad[s p + (i, j)]^T g[p], dbias = sum of g
    over batch and positions.
  """
  _check("conv_backward", x, kernel, g)
  winograd = _use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                           WINOGRAD_MIN_TILES_BACKWARD)
  dx, dw, db = _call(_BACKWARD, [x.shape, kernel.shape, kernel.shape[-1:]], x, kernel, g,
                     stride=stride, padding=padding, winograd=winograd)
  return dx, dw, db


# The algorithms arrive decided ("direct" or "winograd" each way) when the forward is
# traced: a backward traced later (e.g. `jax.jit(vjp)` outside a context that changed the
# environment or the thresholds) keeps the choice made with its forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _conv(x, kernel, bias, stride, padding, forward_algorithm, backward_algorithm):
  del backward_algorithm
  return conv_forward(x, kernel, stride, padding, bias, forward_algorithm)


def _conv_fwd(x, kernel, bias, stride, padding, forward_algorithm, backward_algorithm):
  del backward_algorithm
  return conv_forward(x, kernel, stride, padding, bias, forward_algorithm), (x, kernel)


def _conv_bwd(stride, padding, forward_algorithm, backward_algorithm, residuals, g):
  del forward_algorithm
  x, kernel = residuals
  return conv_backward(x, kernel, g.astype(jnp.float32), stride, padding,
                       backward_algorithm)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
         bias: jax.Array | None = None, algorithm: Algorithm = "auto") -> jax.Array:
  """A float32 convolution (NHWC, HWIO, explicit padding) + bias, all parts in oneDNN.

  Reverse mode only (grad, vjp, also under vmap); forward mode (jvp) is not defined.

  Args:
    x: [B, H, W, Cin] float32.
    kernel: [KH, KW, Cin, Cout] float32.
    stride: the same along H and W.
    padding: ((top, bottom), (left, right)) zeros.
    bias: [Cout] float32, or None (zero; its gradient is computed and dropped).
    algorithm: "direct" (oneDNN's convolution), "winograd" (F(2x2, 3x3) over oneDNN's
      sgemm, native/winograd.h: 3x3 kernels, stride 1, padding 1 only; the products
      need 2.25x fewer multiplications; for finite inputs the values differ by
      rounding only), or "auto":
      Winograd where it applies, both channel counts are at least
      `WINOGRAD_MIN_CHANNELS` and the batch has at least `WINOGRAD_MIN_TILES_FORWARD`
      (forward) or `WINOGRAD_MIN_TILES_BACKWARD` (gradients) 2x2 output tiles, unless
      `DIFFUSION_JAX_WINOGRAD=0` (read when traced); else direct. Forward and
      gradients may thus use different algorithms.

  Returns:
    [B, H', W', Cout] float32.
  """
  decided = [
      "winograd" if _use_winograd(algorithm, kernel.shape, stride, padding, x.shape,
                                  min_tiles) else "direct"
      for min_tiles in (WINOGRAD_MIN_TILES_FORWARD, WINOGRAD_MIN_TILES_BACKWARD)]
  return _conv(x, kernel, _bias_or_zeros(bias, kernel), stride, tuple(map(tuple, padding)),
               *decided)
