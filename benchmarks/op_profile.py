"""Where the time of a compiled program goes: per-operation time from a profiler trace.

  python -m benchmarks.op_profile --what train_step --batch 8     # CIFAR10 network
  python -m benchmarks.op_profile --what forward --batch 16
  python -m benchmarks.op_profile --what train_step --batch 32 --instructions 12
  python -m benchmarks.op_profile --what train_step --batch 8 --kernels xla  # pure-JAX ops

XLA:CPU records one trace event per executed operation (thunk), named after the HLO
instruction. The events are joined with the optimized HLO's `op_name` metadata (the JAX
source path, e.g. `transpose(jvp(UNet))/up_1/block_0/conv1/...`) and summed per category:
forward or backward (`transpose(...)` in the path), convolution, matmul (`dot_general`),
and the other fused kernels by the JAX operation that produced them. Durations are
summed over both worker threads, so shares, not sums, compare with wall time.

The program computes with the operations of the kernel policy (`--kernels`, default
auto: on a CPU the CPU backend's kernels) and compiles with their options, as the product
does. The CPU backend's kernels (oneDNN and Winograd convolutions, GroupNorm, dropout) are
custom calls (`ffi_call` rows): each event lasts the whole call, while the other pool
thread works on it too. XLA's own CPU convolutions (`--kernels xla`) may run on a thread
pool after their thunk has started them: their events then cover the launch, not the
work, so the convolution rows understate them; `benchmarks.conv_breakdown` times them
alone. `--instructions N` lists the costliest single instructions with their result
shapes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import numpy as np

from benchmarks import configs
from benchmarks import harness
from benchmarks import train_step as train_step_bench
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.training import run_setup

_SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "TfrtCpu", "Pjit", "Common",
         "ParseArguments", "Allocate", "PythonRef", "Threadpool")


def hlo_metadata(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (opcode, JAX op_name, result shape) of an optimized HLO module."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(", line)
    if m:
      op_name = re.search(r'op_name="([^"]*)"', line)
      shape = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\([^)]*\)|\S+)", line).group(1)
      out[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "", shape)
  return out


def category(instruction: str, opcode: str, op_name: str) -> str:
  """A readable category: direction, and convolution / matmul / the JAX primitive."""
  direction = "backward" if "transpose(" in op_name else "forward"
  if not op_name:
    return f"{opcode} (no source)"
  primitive = op_name.rsplit("/", 1)[-1]
  if "conv_general_dilated" in primitive:
    kind = "convolution"
  elif "dot_general" in primitive:
    kind = "matmul (attention)" if "/attn" in op_name else "matmul"
  else:
    kind = f"{instruction.split('.')[0]} [{primitive}]"
  return f"{direction}: {kind}"


def profile(fn, args, runs: int = 2
            ) -> tuple[dict[str, float], dict[str, int], float, dict[str, float], dict]:
  """Runs the jitted `fn(*args)` under the profiler `runs` times.

  Returns:
    (category -> seconds per run, category -> events per run, total op seconds per run,
    instruction -> seconds per run, the `hlo_metadata` of the compiled program).
  """
  compiled = fn.lower(*args).compile()
  meta = hlo_metadata(compiled.as_text())
  harness.block(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(runs):
      harness.block(fn(*args))
    jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  seconds, counts = collections.defaultdict(float), collections.Counter()
  per_instruction = collections.defaultdict(float)
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(_SKIP) or name not in meta:
      continue
    opcode, op_name, _ = meta[name]
    if opcode in ("while", "conditional"):  # Their operations have events of their own.
      continue
    key = category(name, opcode, op_name)
    seconds[key] += e["dur"] * 1e-6 / runs
    counts[key] += 1
    per_instruction[name] += e["dur"] * 1e-6 / runs
  total = sum(seconds.values())
  return (dict(seconds), {k: v // runs for k, v in counts.items()}, total,
          dict(per_instruction), meta)


def build(what: str, network: str, batch: int, mesh, ops: ops_lib.Ops):
  """(jitted fn, args) of the program to profile, computing with `ops` over `mesh`; the
  train step donates its state."""
  config = configs.load_config(network)
  config.training.batch_size = batch
  size, channels = config.data.image_size, config.data.channels
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, channels))
  images = harness.shard_batch(images.astype(np.float32), mesh)
  if what == "train_step":
    step, state = train_step_bench.build_ours(config, mesh, ops)
    holder = [state]
    compiled = step.lower(state, images).compile()

    class Step:  # Re-feeds the donated state; `lower` for the HLO text.
      def lower(self, *_):
        return step.lower(holder[0], images)

      def __call__(self, *_):
        holder[0], metrics = compiled(holder[0], images)
        return metrics

    return Step(), ()
  model = run_setup.build_model(config, ops)
  params = run_setup.init_train_state(config, mesh).params
  t = jax.numpy.arange(batch, dtype=jax.numpy.int32) * 7 % 1000
  fn = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False),
               compiler_options=ops.jit_options())
  return fn, (params, images, t)


def main(argv=None):
  """Profiles the program; prints the categories (and instructions) by time."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--what", default="train_step", choices=["train_step", "forward"])
  parser.add_argument("--network", default="cifar10", choices=sorted(configs.NETWORKS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--runs", type=int, default=2)
  parser.add_argument("--top", type=int, default=20)
  parser.add_argument("--instructions", type=int, default=0,
                      help="also list the N costliest HLO instructions")
  harness.add_kernels_flag(parser)
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh(jax.devices()[:1])
  ops = ops_lib.resolve(args.kernels, mesh)
  load_before = harness.load_average()
  fn, fn_args = build(args.what, args.network, args.batch, mesh, ops)
  seconds, counts, total, per_instruction, meta = profile(fn, fn_args, args.runs)
  print(f"## Operation profile: {args.what}, {args.network}, batch {args.batch}, "
        f"kernels={args.kernels}\n")
  print(harness.machine_line())
  print(harness.ops_note(args.kernels, ops, host_memory_reused))
  print(f"load average: before {load_before:.2f}, after {harness.load_average():.2f}; "
        f"summed op time per run {total:.3f} s\n")
  print("| category | ms per run | share | ops per run |")
  print("|---|---|---|---|")
  for key, value in sorted(seconds.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"| {key} | {1e3 * value:.1f} | {100 * value / total:.1f}% | {counts[key]} |")
  if args.instructions:
    print("\n| instruction | result | JAX source | ms per run |")
    print("|---|---|---|---|")
    for name, value in sorted(per_instruction.items(),
                              key=lambda kv: -kv[1])[:args.instructions]:
      _, op_name, shape = meta[name]
      shape = shape if len(shape) <= 100 else shape[:97] + "..."
      print(f"| {name} | {shape} | {op_name.replace('jit(step_fn)/', '')[-70:]} | "
            f"{1e3 * value:.1f} |")


if __name__ == "__main__":
  main()
