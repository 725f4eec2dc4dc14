"""The train step's 3x3 convolutions, piece by piece: forward, input and kernel gradients.

  python -m benchmarks.conv_breakdown --batch 32
  python -m benchmarks.conv_breakdown --batch 8 --xla_defaults  # XLA's rows: its defaults

Traces the U-Net once, collects every 3x3 convolution (input shape, channels, stride),
then times each distinct one alone, in parts:

- XLA's convolution (`ops.reference.conv3x3`, the pure-JAX operation): the forward, the
  input gradient and the kernel gradient, both as JAX differentiates it (the transposes
  of the convolution, `jax.linear_transpose`). Compiled with the CPU backend's compiler
  options (`backends.cpu.compiler_options`: XLA's own CPU convolutions instead of
  YNNPACK's), or with XLA's defaults (what `--kernels xla` programs get) under
  `--xla_defaults`.
- The CPU backend's two calls (`backends.cpu.conv`, where its library builds): the
  forward (with its bias) and the input, kernel and bias gradients in one call (compare
  with the sum of the XLA or PyTorch gradient rows), once with oneDNN's direct
  convolution ("oneDNN direct") and once as the backend runs them ("ours (auto)":
  Winograd's F(2x2, 3x3) for the stride-1 shapes with enough channels and tiles).
- PyTorch's (`conv2d` forward, `torch.nn.grad.conv2d_input/weight`, what its autograd
  runs).

FLOP/s count the direct convolution's multiplications (Winograd's products need 2.25x
fewer). Times times counts give each part's cost per train step, in ms and GFLOP/s, next
to the measured matmul peak. CPU time (both threads) is printed too: on a shared machine
it moves less with other load than wall time does.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import harness
from diffusion_jax import models
from diffusion_jax import ops as ops_lib
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import compiler_options
from diffusion_jax.backends.cpu import conv as cpu_conv
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.ops import reference


def conv_shapes(unet_config: models.UNetConfig, batch: int) -> collections.Counter:
  """(x shape, Cout, stride) -> number of such 3x3 convolutions in one forward."""
  shapes = collections.Counter()

  def spy(x, kernel, stride=1, bias=None):
    shapes[(tuple(x.shape), int(kernel.shape[-1]), int(stride))] += 1
    return reference.conv3x3(x, kernel, stride, bias)

  model = models.UNet(unet_config, ops=dataclasses.replace(ops_lib.XLA, conv3x3=spy))
  size = unet_config.image_size
  x = jax.ShapeDtypeStruct((batch, size, size, unet_config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t),
                 models.param_shapes(unet_config), x, t)
  return shapes


def _time(fns: dict, repeats: int) -> dict:
  """name -> (median wall s, median CPU s), alternating the functions."""
  for fn in fns.values():
    harness.block(fn())
  wall = {k: [] for k in fns}
  cpu_s = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      # One untimed call first: the timed one follows its own framework's work, not the
      # other's (whose worker threads spin on for milliseconds, harness.SETTLE_S), and a
      # sleep instead would leave the threads to wake cold before a millisecond kernel.
      harness.block(fn())
      w, c = time.perf_counter(), time.process_time()
      harness.block(fn())
      cpu_s[name].append(time.process_time() - c)
      wall[name].append(time.perf_counter() - w)
  return {k: (float(np.median(wall[k])), float(np.median(cpu_s[k]))) for k in fns}


def part_functions(x_shape, cout: int, stride: int, jit_options: dict | None,
                   cpu_backend: bool, torch=None) -> dict:
  """name -> zero-argument function computing one part for one convolution.

  Args:
    x_shape: the convolution's input [B, H, W, Cin].
    cout: its output channels.
    stride: 1 or 2.
    jit_options: compiler options of the XLA rows' programs.
    cpu_backend: also time the CPU backend's calls.
    torch: the imported torch module, to time PyTorch's parts; None skips them.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, x_shape[-1], cout)) * 0.05, jnp.float32)
  bias = jnp.zeros((cout,), jnp.float32)
  out_hw = tuple(-(-s // stride) for s in x_shape[1:3])
  g = jnp.asarray(rng.standard_normal((x_shape[0],) + out_hw + (cout,)), jnp.float32)
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
  kernel_aval = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
  jit = functools.partial(jax.jit, compiler_options=jit_options)
  forward = jit(lambda x, w: reference.conv3x3(x, w, stride))
  input_grad = jit(lambda w, g: jax.linear_transpose(
      lambda a: reference.conv3x3(a, w, stride), x_aval)(g)[0])
  kernel_grad = jit(lambda x, g: jax.linear_transpose(
      lambda k: reference.conv3x3(x, k, stride), kernel_aval)(g)[0])
  fns = {"xla forward": lambda: forward(x, kernel),
         "xla input grad": lambda: input_grad(kernel, g),
         "xla kernel grad": lambda: kernel_grad(x, g)}
  padding = reference.conv3x3_padding(x_shape, stride)
  if cpu_backend:
    for label, algorithm in (("oneDNN direct", "direct"), ("ours (auto)", "auto")):
      dnn_forward = jit(functools.partial(cpu_conv.conv_forward, stride=stride,
                                          padding=padding, algorithm=algorithm))
      dnn_backward = jit(functools.partial(cpu_conv.conv_backward, stride=stride,
                                           padding=padding, algorithm=algorithm))
      fns[f"{label} forward"] = functools.partial(dnn_forward, x, kernel, bias=bias)
      fns[f"{label} both gradients"] = functools.partial(dnn_backward, x, kernel, g)
  if torch is not None:
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    pad = padding[0]
    if pad[0] == pad[1]:  # Symmetric padding: the layer torch's autograd would run.
      fns["torch forward"] = lambda: torch.nn.functional.conv2d(tx, tw, stride=stride,
                                                                 padding=pad[0])
      fns["torch input grad"] = lambda: torch.nn.grad.conv2d_input(
          tx.shape, tw, tg, stride=stride, padding=pad[0])
      fns["torch kernel grad"] = lambda: torch.nn.grad.conv2d_weight(
          tx, tw.shape, tg, stride=stride, padding=pad[0])
    else:
      xp = torch.nn.functional.pad(tx, (pad[0], pad[1], pad[0], pad[1]))
      fns["torch forward"] = lambda: torch.nn.functional.conv2d(
          torch.nn.functional.pad(tx, (pad[0], pad[1], pad[0], pad[1])), tw, stride=stride)
      fns["torch input grad"] = lambda: torch.nn.grad.conv2d_input(
          xp.shape, tw, tg, stride=stride)
      fns["torch kernel grad"] = lambda: torch.nn.grad.conv2d_weight(
          xp, tw.shape, tg, stride=stride)
  return fns


def main(argv=None):
  """Times every part of every distinct 3x3 convolution; prints the table."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="cifar10", choices=sorted(configs.NETWORKS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_peer", action="store_true")
  parser.add_argument("--xla_defaults", action="store_true",
                      help="compile the XLA rows with XLA's defaults instead of the CPU "
                           "backend's compiler options")
  parser.add_argument("--verbose", action="store_true", help="print every shape")
  args = parser.parse_args(argv)
  torch = None if args.no_peer else harness.setup_torch()
  on_cpu = jax.default_backend() == "cpu"
  xla_options = None if args.xla_defaults or not on_cpu else compiler_options.options()
  unavailable = cpu.unavailable_reason() if on_cpu else f"JAX runs on {jax.default_backend()}"
  load_before = harness.load_average()
  peak = harness.matmul_peak("float32", torch_module=torch)
  unet_config = models.unet_config_from(configs.load_config(args.network))
  shapes = conv_shapes(unet_config, args.batch)
  totals = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # wall, cpu, flops
  for (x_shape, cout, stride), count in sorted(shapes.items()):
    out_pixels = x_shape[0] * -(-x_shape[1] // stride) * -(-x_shape[2] // stride)
    flops = 2.0 * out_pixels * 9 * x_shape[-1] * cout
    fns = part_functions(x_shape, cout, stride, xla_options, unavailable is None, torch)
    for name, (wall, cpu_s) in _time(fns, args.repeats).items():
      parts = 2 if name.endswith("both gradients") else 1
      totals[name][0] += count * wall
      totals[name][1] += count * cpu_s
      totals[name][2] += count * flops * parts
      if args.verbose:
        print(f"{x_shape} -> {cout} s{stride} x{count}: {name} {wall * 1e3:.2f} ms "
              f"({flops / wall / 1e9:.0f} GFLOP/s)")
  print(f"## 3x3 convolutions of one {args.network} train step, batch {args.batch}\n")
  print(harness.machine_line())
  print(f"load average: before {load_before:.2f}, after {harness.load_average():.2f}; "
        f"matmul peak {peak['peak'] / 1e9:.0f} GFLOP/s "
        f"(jax {peak['jax'] / 1e9:.0f}, torch {peak.get('torch', 0) / 1e9:.0f}); "
        f"{sum(shapes.values())} convolutions per forward")
  print(f"xla rows compiled with {xla_options or 'XLA defaults'}; CPU backend rows: "
        f"{'timed' if unavailable is None else 'left out: ' + unavailable}; "
        f"{harness.host_memory_note(host_memory_reused)}\n")
  print("| part | ms per step | GFLOP/s | % of peak | CPU ms per step |")
  print("|---|---|---|---|---|")
  for name, (wall, cpu_s, flops) in totals.items():
    print(f"| {name} | {wall * 1e3:.0f} | {flops / wall / 1e9:.0f} | "
          f"{100 * flops / wall / peak['peak']:.0f}% | {cpu_s * 1e3:.0f} |")


if __name__ == "__main__":
  main()
