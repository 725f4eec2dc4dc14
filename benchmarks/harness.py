"""Measurement helpers shared by the benchmark scripts: timing, peaks, memory, tables.

Every script measures our figure and the peer's in the same process, alternating the
two after warm-up, and reports medians; it measures the hardware peak (a large matmul
through JAX and through PyTorch, the larger counts) in the same run, and prints the load
average before and after, since other work on a shared machine pollutes timings.

"Ours" is the program as the product runs it: the U-Net's operations chosen by the kernel
policy (`--kernels`, default auto: `ops.resolve("auto", mesh)`, on a CPU the CPU
backend's kernels) and compiled with their `jit_options()`. The scripts call
`backends.cpu.host_memory.reuse_freed_memory()` first thing, before JAX computes (as
`diffusion_jax.main` does for CPU jobs; here whatever `--kernels` says, so that the
operations compare on equal terms), and say in their notes what it returned and which
operations ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding

# Counted model FLOPs (REFERENCE.md): one forward of the CIFAR10 network on a 32x32 image
# and of the 256x256 network; a train step costs three forwards.
CIFAR10_FORWARD_FLOPS = 12.1e9
LARGE256_FORWARD_FLOPS = 496e9
TRAIN_STEP_FORWARDS = 3


def setup_torch(threads: int | None = None):
  """Imports torch with `threads` intra-op threads (default: all cores); returns it."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch


def load_average() -> float:
  """The 1-minute load average (processes running or waiting for a core)."""
  return os.getloadavg()[0]


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or the platform's processor string)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def machine_line() -> str:
  """One line naming the machine, the JAX backend and the date."""
  devices = jax.devices()
  kind = devices[0].device_kind if devices else "?"
  return (f"{datetime.date.today().isoformat()} | CPU: {cpu_model()}, {os.cpu_count()} "
          f"cores | JAX {jax.__version__} on {jax.default_backend()} ({len(devices)} x "
          f"{kind})")


def add_kernels_flag(parser) -> None:
  """Adds `--kernels` (the kernel policy of ours, `model.kernels`) to an argparse parser."""
  parser.add_argument(
      "--kernels", default="auto", choices=ops_lib.POLICIES,
      help="the operations of ours: auto = what the product runs (the CPU backend's "
           "kernels on a CPU where they build, else the pure-JAX ones), xla = the pure-JAX "
           "operations, native = the CPU backend's kernels")


def host_memory_note(reused: bool) -> str:
  """The notes' words for the return value of `host_memory.reuse_freed_memory()`."""
  if reused:
    return "host memory: freed buffers reused (diffusion_jax/backends/cpu/host_memory.py)"
  return "host memory: the allocator's defaults (reuse_freed_memory() did not apply)"


def ops_note(kernels: str, ops: ops_lib.Ops, host_memory_reused: bool) -> str:
  """One note naming the operations ours ran with (`--kernels` and what it resolved to)
  and the host memory setting."""
  return (f"ours: --kernels {kernels} -> {ops.name}: {ops.description}; "
          f"{host_memory_note(host_memory_reused)}")


def shard_batch(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global batch split over `sharding.DATA_AXIS` from this process's rows of it.

  Args:
    array: this process's consecutive rows of the global batch (all rows when there is a
      single process), e.g. [B_local, H, W, C].
    mesh: the data-parallel mesh (`sharding.make_mesh`).
  """
  global_shape = (array.shape[0] * jax.process_count(),) + tuple(array.shape[1:])
  return jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                                np.asarray(array), global_shape)


def block(tree):
  """Waits for every JAX array in `tree` (torch results are synchronous on CPU)."""
  return jax.block_until_ready(tree)


# Untimed pause before each timed call. Both frameworks' worker threads keep spinning for
# a few milliseconds after their last parallel region (PyTorch's OpenMP pool, XLA's Eigen
# pool); on a 2-core machine whatever runs next loses a core meanwhile. Measured here on a
# 14 ms convolution: XLA right after PyTorch 17.9 ms, after 1 ms 17.6, after 5 ms 15.2,
# after 20 ms 14.0; PyTorch right after XLA 14.4 ms, after 100 ms 12.3.
SETTLE_S = 0.05


def time_alternating(fns: dict[str, Callable[[], object]], *, warmup: int = 1,
                     repeats: int = 5, settle_s: float = SETTLE_S) -> dict[str, float]:
  """Median seconds per call of each function, calling them in turn (A B A B ...).

  Args:
    fns: name -> a zero-argument function that runs one measured unit to completion.
    warmup: untimed calls of each function first (compilation, caches).
    repeats: timed calls of each function.
    settle_s: untimed pause before each timed call, so that no call pays for the
      previous one's spinning threads (SETTLE_S).

  Returns:
    name -> median seconds.
  """
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(settle_s)
      start = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def timed_first_call(fn: Callable[[], object]) -> float:
  """Seconds of one call (for the first call of a jitted function: mostly compilation)."""
  start = time.perf_counter()
  block(fn())
  return time.perf_counter() - start


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5,
                torch_module=None) -> dict[str, float]:
  """FLOP/s of a large square matmul through JAX (and PyTorch when given): the peak.

  Args:
    dtype: "float32" or "bfloat16".
    size: the matrices are [size, size].
    repeats: timed runs (median) after one warm-up.
    torch_module: the imported torch module, to measure its matmul too.

  Returns:
    {"jax": flop/s, "torch": flop/s (when measured), "peak": the larger}.
  """
  flops = 2.0 * size**3
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), dtype)
  matmul = jax.jit(lambda x: x @ x)
  fns = {"jax": lambda: matmul(a)}
  if torch_module is not None:
    t = torch_module.from_numpy(np.array(a.astype(jnp.float32))).to(
        getattr(torch_module, dtype))
    fns["torch"] = lambda: t @ t
  seconds = time_alternating(fns, warmup=1, repeats=repeats)
  out = {name: flops / s for name, s in seconds.items()}
  out["peak"] = max(out.values())
  return out


def _read_status(field: str) -> int | None:
  """A size field (e.g. VmRSS) of /proc/self/status in bytes; None where unreadable."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


@dataclasses.dataclass
class PeakMemory:
  """Peak memory of a block: RSS high-water delta (CPU) or device peak (accelerators)."""
  bytes: int | None = None
  how: str = ""


@contextlib.contextmanager
def peak_memory(device: jax.Device | None = None) -> Iterator[PeakMemory]:
  """Measures the peak memory used while the block runs.

  On an accelerator: the device's `peak_bytes_in_use` (which is not resettable, so the
  figure is the process-wide device peak up to the end of the block). On CPU: the
  process's resident-set high-water mark, reset before the block (Linux
  /proc/self/clear_refs), minus the resident set at its start.
  """
  result = PeakMemory()
  device = device or jax.devices()[0]
  if device.platform != "cpu":
    yield result
    stats = device.memory_stats() or {}
    result.bytes = stats.get("peak_bytes_in_use")
    result.how = "device peak_bytes_in_use"
    return
  start = _read_status("VmRSS")
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # Resets VmHWM to the current RSS.
    resettable = True
  except OSError:
    resettable = False
  yield result
  peak = _read_status("VmHWM")
  if start is not None and peak is not None and resettable:
    result.bytes = max(peak - start, 0)
    result.how = "process peak RSS delta"


def gib(n: float | None) -> str:
  """Bytes as GiB with two decimals ("n/a" for None)."""
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


@dataclasses.dataclass
class Row:
  """One benchmark row: our throughput and the peer's, and FLOPs per unit for the peak."""
  name: str
  ours: float  # units per second
  peer: float | None  # units per second
  unit: str
  flops_per_unit: float | None = None
  precision: str = "float32"  # Which measured peak the FLOP rate is compared with.
  ours_mem: int | None = None
  peer_mem: int | None = None


def print_table(title: str, rows: Sequence[Row], peaks: dict[str, dict[str, float]],
                load_before: float, load_after: float, notes: Sequence[str] = ()) -> str:
  """Prints (and returns) one Markdown table with ratio and fraction of the peak.

  Args:
    title: the table's heading.
    rows: the measurements.
    peaks: precision -> `matmul_peak` result.
    load_before, load_after: load averages around the measurements.
    notes: lines printed under the table.
  """
  peak_desc = "; ".join(
      f"{precision}: " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in p.items())
      for precision, p in peaks.items())
  lines = [f"## {title}", "", machine_line(),
           f"load average (1 min): before {load_before:.2f}, after {load_after:.2f} | "
           f"matmul GFLOP/s measured in this run: {peak_desc}", "",
           "| benchmark | ours | peer | ours / peer | ours GFLOP/s | ours % of peak | "
           "peer % of peak | peak mem ours | peak mem peer |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = f"{r.ours / r.peer:.2f}x" if r.peer else "n/a"
    peak = peaks.get(r.precision, {}).get("peak")
    if r.flops_per_unit and peak:
      gflops = f"{r.ours * r.flops_per_unit / 1e9:.1f}"
      frac = f"{100 * r.ours * r.flops_per_unit / peak:.0f}%"
      peer_frac = (f"{100 * r.peer * r.flops_per_unit / peak:.0f}%" if r.peer else "n/a")
    else:
      gflops = frac = peer_frac = "n/a"
    peer = f"{r.peer:.3g} {r.unit}" if r.peer else "n/a"
    lines.append(f"| {r.name} | {r.ours:.3g} {r.unit} | {peer} | {ratio} | {gflops} | "
                 f"{frac} | {peer_frac} | {gib(r.ours_mem)} | {gib(r.peer_mem)} |")
  lines += [""] + [f"- {n}" for n in notes]
  text = "\n".join(lines)
  print(text, flush=True)
  return text
