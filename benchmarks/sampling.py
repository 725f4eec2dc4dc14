"""Sampling throughput (images/s): our compiled samplers vs diffusers' pipelines.

  python -m benchmarks.sampling                       # CPU: batch 8, 10 steps each
  python -m benchmarks.sampling --kernels xla         # ours with the pure-JAX ops
  python -m benchmarks.sampling --batch 256 --ancestral_steps 1000 --ddim_steps 50 \
      --no_peer --precision bfloat16                  # on a GPU: the paper's 256 samples

Ours: `samplers.ancestral_sample` (all T steps) or, for fewer steps, `denoise_from` over
the last k timesteps (the same per-step work: a forward, the posterior mean and noise),
and `samplers.ddim_sample` over `ddim_timesteps(T, S)`, each one jitted program, with the
operations of the kernel policy (`--kernels`, default auto: on a CPU the CPU backend's
kernels) and their compiler options. Peer:
diffusers' `DDPMPipeline(num_inference_steps=k)` and `DDIMPipeline(num_inference_steps=S,
eta=0)` with the same weights. A sampling step counts one forward. The figure for the
full 1000-step ancestral run follows from the per-step throughput (steps cost the same).
"""

from __future__ import annotations

import argparse
import time

import jax

from benchmarks import configs
from benchmarks import harness
from benchmarks import peers
from benchmarks import train_step as train_step_bench
from diffusion_jax import models
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion import samplers
from diffusion_jax.training import run_setup


def make_sampler(config, kind: str, steps: int, ops: ops_lib.Ops):
  """Returns the jitted `sample(params, keys) -> [B, H, W, C]` of our sampler (the U-Net
  computing with `ops`, compiled with their options)."""
  model = run_setup.build_model(config, ops)
  schedule = run_setup.build_schedule(config)
  d = config.diffusion
  size, channels = int(config.data.image_size), int(config.data.channels)
  shape = (size, size, channels)
  num_timesteps = int(d.num_timesteps)
  kwargs = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                clip_denoised=True)

  def sample(params, keys):
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    if kind == "ddim":
      return samplers.ddim_sample(model_fn, schedule, keys, shape, eta=0.0,
                                  timesteps=samplers.ddim_timesteps(num_timesteps, steps),
                                  **kwargs)
    if steps == num_timesteps:
      return samplers.ancestral_sample(model_fn, schedule, keys, shape, **kwargs)
    x_t = randomness.per_example_normal(keys, num_timesteps, shape, schedule.dtype)
    return samplers.denoise_from(model_fn, schedule, x_t, steps - 1, keys, **kwargs)

  return jax.jit(sample, compiler_options=ops.jit_options())


def measure(config, kind: str, steps: int, batch: int, repeats: int, torch, params,
            unet_config, flops: float, precision: str, ops: ops_lib.Ops):
  """One row (images/s through `steps` steps) and our compile seconds."""
  sample = make_sampler(config, kind, steps, ops)
  keys = jax.random.split(jax.random.key(0), batch)
  start = time.perf_counter()
  compiled = sample.lower(params, keys).compile()
  compile_s = time.perf_counter() - start
  fns = {"ours": lambda: compiled(params, keys)}
  peer_mem = None
  if torch is not None:
    model = peers.torch_unet(jax.device_get(params), unet_config, torch)
    num_timesteps = int(config.diffusion.num_timesteps)
    if kind == "ddim":
      pipe = peers.ddim_pipeline(model, num_timesteps)
      run = lambda: peers.run_pipeline(pipe, torch, batch, steps, eta=0.0)
    else:
      variance = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[
          config.diffusion.model_var_type]
      pipe = peers.ddpm_pipeline(model, num_timesteps, variance)
      run = lambda: peers.run_pipeline(pipe, torch, batch, steps)
    with harness.peak_memory() as mem:
      run()
    peer_mem = None if mem.bytes is None else mem.bytes + peers.state_bytes(
        list(model.parameters()))
    fns["peer"] = run
  with harness.peak_memory() as ours_mem:
    fns["ours"]()
  seconds = harness.time_alternating(fns, warmup=1, repeats=repeats)
  ours_bytes = train_step_bench.planned_bytes(compiled)
  if ours_mem.how == "device peak_bytes_in_use":
    ours_bytes = ours_mem.bytes
  name = "DDIM (eta 0)" if kind == "ddim" else "ancestral"
  row = harness.Row(
      name=f"{name}, {steps} steps, batch {batch}, {precision}",
      ours=batch / seconds["ours"],
      peer=batch / seconds["peer"] if "peer" in seconds else None, unit="img/s",
      flops_per_unit=steps * flops, precision=precision, ours_mem=ours_bytes,
      peer_mem=peer_mem)
  return row, compile_s, seconds


def main(argv=None):
  """Measures the ancestral and DDIM rows; prints the table."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="cifar10", choices=sorted(configs.NETWORKS))
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--ancestral_steps", type=int, default=10,
                      help="1000 = the full ancestral sampler")
  parser.add_argument("--ddim_steps", type=int, default=10, help="the paper setting: 50")
  parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no_peer", action="store_true", help="skip PyTorch (e.g. on GPU)")
  parser.add_argument("--torch_threads", type=int, default=None)
  harness.add_kernels_flag(parser)
  args = parser.parse_args(argv)
  torch = None if args.no_peer else harness.setup_torch(args.torch_threads)
  ops = ops_lib.resolve(args.kernels, sharding.make_mesh(jax.devices()[:1]))
  load_before = harness.load_average()
  peaks = {"float32": harness.matmul_peak("float32", torch_module=torch)}
  if args.precision == "bfloat16":
    peaks["bfloat16"] = harness.matmul_peak("bfloat16", torch_module=torch)
  config = configs.load_config(args.network)
  config.model.dtype = args.precision
  unet_config = models.unet_config_from(config)
  flops, origin = configs.forward_flops(args.network, unet_config)
  params = models.init_params(unet_config, jax.random.key(0))
  rows, notes = [], []
  for kind, steps in (("ancestral", args.ancestral_steps), ("ddim", args.ddim_steps)):
    row, compile_s, seconds = measure(config, kind, steps, args.batch, args.repeats, torch,
                                      params, unet_config, flops, args.precision, ops)
    rows.append(row)
    full = ""
    if kind == "ancestral":
      per_step = seconds["ours"] / steps
      t = int(config.diffusion.num_timesteps)
      full = (f"; {t} ancestral steps for this batch would take {per_step * t:.0f} s "
              f"(ours)")
      if "peer" in seconds:
        full += f", {seconds['peer'] / steps * t:.0f} s (peer)"
    notes.append(f"{row.name}: our compile {compile_s:.1f} s{full}.")
  notes.append(f"{args.network}: {flops / 1e9:.2f} GFLOP per forward ({origin}); one forward "
               f"per step. Random weights (timing does not depend on their values).")
  notes.append(f"median of {args.repeats} runs after 1 warm-up, alternating, "
               f"{harness.SETTLE_S * 1e3:.0f} ms pause before each; torch threads: "
               f"{torch.get_num_threads() if torch else 'n/a'}; JAX: default threads.")
  notes.append(harness.ops_note(args.kernels, ops, host_memory_reused) + ".")
  notes.append("peak mem ours: XLA's planned bytes (arguments + outputs + temporaries); "
               "peer: parameters + the RSS high-water delta of its first run.")
  harness.print_table("Sampling", rows, peaks, load_before, harness.load_average(), notes)


if __name__ == "__main__":
  main()
