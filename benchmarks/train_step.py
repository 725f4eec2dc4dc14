"""Train-step throughput (images/s): our jitted update vs diffusers' UNet2DModel in PyTorch.

  python -m benchmarks.train_step                           # CIFAR10 batch 8 and 32, MNIST
  python -m benchmarks.train_step --kernels xla             # ours with the pure-JAX ops
  python -m benchmarks.train_step --network cifar10 --batch 128 --precision bfloat16 \
      --no_peer                                             # on a GPU
  python -m benchmarks.train_step --network 256 --batch 64 --precision bfloat16 --no_peer
  python -m benchmarks.train_step --network 256 --batch 64 --precision bfloat16 --no_peer \
      --remat                                               # if it does not fit

Ours: `training.train_step.make_train_step` exactly as training compiles it (timesteps
and noise per example, dropout, L_simple, clipping, Adam, EMA, donated state), with the
operations of the kernel policy (`--kernels`, default auto: on a CPU the CPU backend's
kernels) and their compiler options. The peer does the same work in PyTorch with the same
weights (benchmarks/peers.py). A train step counts as three forwards.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks import configs
from benchmarks import harness
from benchmarks import peers
from diffusion_jax import models
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.training import run_setup


def build_ours(config, mesh, ops: ops_lib.Ops):
  """Returns the jitted train step computing with `ops` and a fresh state (replicated
  over `mesh`), as training builds them."""
  step = run_setup.build_train_step(config, mesh, ops)
  state = run_setup.init_train_state(config, mesh)
  return step, state


def planned_bytes(compiled) -> int | None:
  """Bytes XLA plans for a compiled program: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
               m.alias_size_in_bytes)
  except (AttributeError, NotImplementedError, TypeError):
    return None


def measure(network: str, batch: int, precision: str, repeats: int, torch, mesh,
            ops: ops_lib.Ops, remat: bool = False):
  """One row: our (computing with `ops`) and the peer's images/s and peak memory."""
  config = configs.load_config(network)
  config.training.batch_size = batch
  config.model.dtype = precision
  config.model.remat = remat
  unet_config = models.unet_config_from(config)
  flops, _ = configs.forward_flops(network, unet_config)
  step, state = build_ours(config, mesh, ops)
  rng = np.random.default_rng(0)
  shape = (batch, unet_config.image_size, unet_config.image_size, unet_config.in_channels)
  images_np = rng.uniform(-1, 1, shape).astype(np.float32)
  images = harness.shard_batch(images_np, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, images).compile()
  compile_s = time.perf_counter() - start
  holder = [state]

  def ours():
    holder[0], metrics = compiled(holder[0], images)
    return metrics

  fns = {"ours": ours}
  peer_mem = None
  if torch is not None:
    schedule = run_setup.build_schedule(config)
    params = jax.device_get(state.params)
    model = peers.torch_unet(params, unet_config, torch, train=True)
    peer = peers.TorchTrainStep(
        model, torch, num_timesteps=int(config.diffusion.num_timesteps),
        alphas_cumprod=np.exp(np.asarray(schedule.log_alphas_cumprod, np.float64)),
        dtype=torch.bfloat16 if precision == "bfloat16" else None)
    images_torch = torch.from_numpy(images_np.transpose(0, 3, 1, 2).copy())
    with harness.peak_memory() as mem:  # The first call: nothing cached yet.
      peer(images_torch)
    peer_mem = None if mem.bytes is None else mem.bytes + peer.resident_bytes()
    fns["peer"] = lambda: peer(images_torch)
  with harness.peak_memory() as ours_mem:
    ours()
  seconds = harness.time_alternating(fns, warmup=1, repeats=repeats)
  ours_bytes = planned_bytes(compiled)
  if ours_mem.how == "device peak_bytes_in_use":
    ours_bytes = ours_mem.bytes
  row = harness.Row(
      name=f"{network} train step, batch {batch}, {precision}{', remat' if remat else ''}",
      ours=batch / seconds["ours"],
      peer=batch / seconds["peer"] if "peer" in seconds else None, unit="img/s",
      flops_per_unit=harness.TRAIN_STEP_FORWARDS * flops, precision=precision,
      ours_mem=ours_bytes, peer_mem=peer_mem)
  return row, compile_s


def main(argv=None):
  """Measures one row per network and batch; prints the table."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", nargs="+", default=["cifar10", "mnist"],
                      choices=sorted(configs.NETWORKS))
  parser.add_argument("--batch", type=int, nargs="+", default=None,
                      help="global batch sizes (default: 8 32 for cifar10, 32 for mnist)")
  parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--no_peer", action="store_true", help="skip PyTorch (e.g. on GPU)")
  parser.add_argument("--torch_threads", type=int, default=None)
  parser.add_argument("--remat", action="store_true",
                      help="ours with model.remat=True (blocks recomputed in the backward "
                           "pass: less memory, more compute); the peer is unchanged")
  harness.add_kernels_flag(parser)
  args = parser.parse_args(argv)
  torch = None if args.no_peer else harness.setup_torch(args.torch_threads)
  mesh = sharding.make_mesh(jax.devices()[:1])
  ops = ops_lib.resolve(args.kernels, mesh)
  load_before = harness.load_average()
  peaks = {"float32": harness.matmul_peak("float32", torch_module=torch)}
  if args.precision == "bfloat16":
    peaks["bfloat16"] = harness.matmul_peak("bfloat16", torch_module=torch)
  rows, notes = [], []
  default_batches = {"cifar10": [8, 32], "mnist": [32], "256": [1]}
  for network in args.network:
    for batch in args.batch or default_batches[network]:
      row, compile_s = measure(network, batch, args.precision, args.repeats, torch, mesh,
                               ops, remat=args.remat)
      rows.append(row)
      notes.append(f"{row.name}: our compile {compile_s:.1f} s.")
  for network in args.network:
    unet_config = models.unet_config_from(configs.load_config(network))
    flops, origin = configs.forward_flops(network, unet_config)
    notes.append(f"{network}: {flops / 1e9:.2f} GFLOP per forward ({origin}); a train step "
                 f"counts 3 forwards.")
  notes.append(f"median of {args.repeats} timed steps after 1 warm-up, ours and peer "
               f"alternating, {harness.SETTLE_S * 1e3:.0f} ms pause before each; torch threads: "
               f"{torch.get_num_threads() if torch else 'n/a'}; JAX: default threads.")
  notes.append(harness.ops_note(args.kernels, ops, host_memory_reused) + ".")
  notes.append("peak mem ours: XLA's planned bytes of the step (arguments + outputs + "
               "temporaries - donated), or the device's peak on an accelerator; peer: "
               "parameters, EMA and Adam moments + the RSS high-water delta of its first "
               "step.")
  harness.print_table("Train step", rows, peaks, load_before, harness.load_average(), notes)


if __name__ == "__main__":
  main()
