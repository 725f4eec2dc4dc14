"""The train step's 3x3 convolutions, piece by piece: forward, input and kernel gradients.

  python -m benchmarks.conv_breakdown --batch 32

Traces the U-Net once, collects every 3x3 convolution (input shape, channels, stride),
then times each distinct one alone in its three parts (forward; input gradient = XLA's
transposed convolution; kernel gradient by each method of `conv.conv3x3`; on CPU, shapes with
at most `conv.PATCHES_MAX_POSITIONS` output positions get the parts of the patch product that
`conv.conv3x3` runs there, and "kernel grad (xla)" is its kernel gradient) and the same
parts in PyTorch (`conv2d` forward, `torch.nn.grad.conv2d_input/weight`, what its
autograd runs). Where `conv.conv3x3` runs float32 convolutions through oneDNN
(`models/onednn.py`: CPU, one device), its two calls are timed too: the forward (with
its bias) and the input, kernel and bias gradients in one call (compare with the sum of
the XLA or PyTorch gradient rows), once with oneDNN's direct convolution and once as
`conv.conv3x3` chooses ("auto": Winograd's F(2x2, 3x3) where it pays). FLOP/s count the
direct convolution's multiplications (Winograd's products need 2.25x fewer). Times times counts give each part's cost per train
step, in ms and GFLOP/s, next to the measured matmul peak. CPU time (both threads) is
printed too: on a shared machine it moves less with other load than wall time does.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import harness
from diffusion_jax import compiler_options
from diffusion_jax import host_memory
from diffusion_jax import models
from diffusion_jax.models import conv
from diffusion_jax.models import onednn


def conv_shapes(unet_config: models.UNetConfig, batch: int) -> collections.Counter:
  """(x shape, Cout, stride) -> number of such 3x3 convolutions in one forward."""
  shapes = collections.Counter()
  original = conv.conv3x3

  def spy(x, kernel, stride=1, **kwargs):
    shapes[(tuple(x.shape), int(kernel.shape[-1]), int(stride))] += 1
    return original(x, kernel, stride, **kwargs)

  model = models.UNet(unet_config)
  size = unet_config.image_size
  x = jax.ShapeDtypeStruct((batch, size, size, unet_config.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = models.param_shapes(unet_config)  # Traces the model itself: before the spy.
  conv.conv3x3 = spy
  try:
    jax.eval_shape(lambda p, x, t: model.apply({"params": p}, x, t), params, x, t)
  finally:
    conv.conv3x3 = original
  return shapes


def _time(fns: dict, repeats: int) -> dict:
  """name -> (median wall s, median CPU s), alternating the functions."""
  for fn in fns.values():
    harness.block(fn())
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      # One untimed call first: the timed one follows its own framework's work, not the
      # other's (whose worker threads spin on for milliseconds, harness.SETTLE_S), and a
      # sleep instead would leave the threads to wake cold before a millisecond kernel.
      harness.block(fn())
      w, c = time.perf_counter(), time.process_time()
      harness.block(fn())
      cpu[name].append(time.process_time() - c)
      wall[name].append(time.perf_counter() - w)
  return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in fns}


def part_functions(x_shape, cout: int, stride: int, torch=None) -> dict:
  """name -> zero-argument function computing one part for one convolution."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, x_shape[-1], cout)) * 0.05, jnp.float32)
  out_hw = tuple(-(-s // stride) for s in x_shape[1:3])
  g = jnp.asarray(rng.standard_normal((x_shape[0],) + out_hw + (cout,)), jnp.float32)
  jit = functools.partial(jax.jit, compiler_options=compiler_options.for_default_backend())
  with conv.cpu_library("xla"):  # XLA's forward (traced here: the choice acts at tracing)
    forward = jit(lambda x, w: conv.conv3x3(x, w, stride)).lower(x, kernel).compile()
  x_aval = jax.ShapeDtypeStruct(x.shape, x.dtype)
  input_grad = jit(lambda w, g: conv._input_grad(w, g, stride, x_aval))  # pylint: disable=protected-access
  grad_matmul = jit(lambda x, g: conv.kernel_grad_matmul(x, g, stride))
  grad_xla = jit(lambda x, g: conv.kernel_grad_xla(x, g, stride, kernel.shape))
  if conv._use_patches(x_shape, stride):  # pylint: disable=protected-access
    # The U-Net runs these maps as a product of 3x3 patches: time that one's parts.
    input_grad = jit(lambda w, g: jax.vjp(
        lambda a: conv.conv3x3_patches(a, w, stride), jnp.zeros(x_shape, jnp.float32))[1](g)[0])
    grad_xla = jit(lambda x, g: jax.vjp(
        lambda w: conv.conv3x3_patches(x, w, stride), kernel)[1](g)[0])
  fns = {"forward": lambda: forward(x, kernel), "input grad": lambda: input_grad(kernel, g),
         "kernel grad (matmul)": lambda: grad_matmul(x, g),
         "kernel grad (xla)": lambda: grad_xla(x, g)}
  if conv.onednn_enabled():
    padding = (conv.same_padding(x_shape[1], stride), conv.same_padding(x_shape[2], stride))
    for label, algorithm in (("oneDNN direct", "direct"), ("ours (auto)", "auto")):
      dnn_forward = jit(functools.partial(onednn.conv_forward, stride=stride,
                                          padding=padding, algorithm=algorithm))
      dnn_backward = jit(functools.partial(onednn.conv_backward, stride=stride,
                                           padding=padding, algorithm=algorithm))
      fns[f"{label} forward"] = functools.partial(dnn_forward, x, kernel)
      fns[f"{label} both gradients"] = functools.partial(dnn_backward, x, kernel, g)
  if torch is not None:
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    tw = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
    tg = torch.from_numpy(np.asarray(g).transpose(0, 3, 1, 2).copy())
    pad = conv.same_padding(x_shape[1], stride)

    def t_forward():
      xp = torch.nn.functional.pad(tx, (pad[0], pad[1], pad[0], pad[1]))
      return torch.nn.functional.conv2d(xp, tw, stride=stride)

    if pad[0] == pad[1]:  # Symmetric padding: the layer torch's autograd would run.
      fns["torch forward"] = lambda: torch.nn.functional.conv2d(tx, tw, stride=stride,
                                                                 padding=pad[0])
      fns["torch input grad"] = lambda: torch.nn.grad.conv2d_input(
          tx.shape, tw, tg, stride=stride, padding=pad[0])
      fns["torch kernel grad"] = lambda: torch.nn.grad.conv2d_weight(
          tx, tw.shape, tg, stride=stride, padding=pad[0])
    else:
      xp = torch.nn.functional.pad(tx, (pad[0], pad[1], pad[0], pad[1]))
      fns["torch forward"] = t_forward
      fns["torch input grad"] = lambda: torch.nn.grad.conv2d_input(
          xp.shape, tw, tg, stride=stride)
      fns["torch kernel grad"] = lambda: torch.nn.grad.conv2d_weight(
          xp, tw.shape, tg, stride=stride)
  return fns


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="cifar10", choices=sorted(configs.NETWORKS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_peer", action="store_true")
  parser.add_argument("--verbose", action="store_true", help="print every shape")
  args = parser.parse_args(argv)
  torch = None if args.no_peer else harness.setup_torch()
  load_before = harness.load_average()
  peak = harness.matmul_peak("float32", torch_module=torch)
  unet_config = models.unet_config_from(configs.load_config(args.network))
  shapes = conv_shapes(unet_config, args.batch)
  totals = collections.defaultdict(lambda: [0.0, 0.0, 0.0])  # wall, cpu, flops
  for (x_shape, cout, stride), count in sorted(shapes.items()):
    out_pixels = x_shape[0] * -(-x_shape[1] // stride) * -(-x_shape[2] // stride)
    flops = 2.0 * out_pixels * 9 * x_shape[-1] * cout
    times = _time(part_functions(x_shape, cout, stride, torch), args.repeats)
    for name, (wall, cpu) in times.items():
      parts = 2 if name.endswith("both gradients") else 1
      totals[name][0] += count * wall
      totals[name][1] += count * cpu
      totals[name][2] += count * flops * parts
      if args.verbose:
        print(f"{x_shape} -> {cout} s{stride} x{count}: {name} {wall * 1e3:.2f} ms "
              f"({flops / wall / 1e9:.0f} GFLOP/s)")
  print(f"## 3x3 convolutions of one {args.network} train step, batch {args.batch}\n")
  print(harness.machine_line())
  print(f"load average: before {load_before:.2f}, after {harness.load_average():.2f}; "
        f"matmul peak {peak['peak'] / 1e9:.0f} GFLOP/s "
        f"(jax {peak['jax'] / 1e9:.0f}, torch {peak.get('torch', 0) / 1e9:.0f}); "
        f"{sum(shapes.values())} convolutions per forward\n")
  print("| part | ms per step | GFLOP/s | % of peak | CPU ms per step |")
  print("|---|---|---|---|---|")
  for name, (wall, cpu, flops) in totals.items():
    print(f"| {name} | {wall * 1e3:.0f} | {flops / wall / 1e9:.0f} | "
          f"{100 * flops / wall / peak['peak']:.0f}% | {cpu * 1e3:.0f} |")


if __name__ == "__main__":
  host_memory.reuse_freed_memory()
  main()
