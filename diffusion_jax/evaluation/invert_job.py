r"""DDIM inversion job: images -> latents x_T -> reconstructions, in resumable shards.

  python -m diffusion_jax.main --mode=invert --config configs/cifar10.py --workdir DIR \
      [--config.sampling.num_steps=100 --config.sampling.invert_num_images=64 \
       --config.sampling.invert_source=images.npz:x]

The first `sampling.invert_num_images` images of `sampling.invert_source` (an .npz,
`path.npz[:key]`, or "" for `data.eval_split`) are encoded by DDIM inversion over the DDIM
grid of `sampling.num_steps` steps (`sampling.spacing`, default the DDIM paper's
uniform grid; noise-free end), each step refined by
`sampling.invert_fixed_point_iterations` more network calls
(`diffusion.inversion.encode`), and decoded again by DDIM with eta = 0
(`inversion.decode`); nothing is clipped. `sampling.sampler` is not used.

Shard k, `inversions/<tag>/shard_<k>.npz`, holds images [k * shard_size, (k + 1) *
shard_size) (`sampling.shard_size`): `images` uint8 (the originals), `latents` and
`reconstructions` float32 in the model's units ([-1, 1] for images), `indices`. Shards are
written atomically once complete, so a killed job resumes at the first missing one; a
manifest ties the directory to its settings. The summary gives the reconstruction error
(RMS and largest on the [-1, 1] scale, and the PSNR of the uint8-rounded reconstructions)
and the latents' mean and standard deviation.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Dict

from absl import logging
import jax
import ml_collections
import numpy as np

from diffusion_jax import image_grid
from diffusion_jax import progress
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import inversion
from diffusion_jax.diffusion import timesteps as timesteps_lib
from diffusion_jax.evaluation import image_sources
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results

INVERSIONS_DIR = "inversions"


def inversion_grid(config: ml_collections.ConfigDict) -> timesteps_lib.Grid:
  """The DDIM grid of the job: `sampling.num_steps` steps of `sampling.spacing` (default
  "uniform"), noise-free end."""
  s = config.sampling
  name = s.get("spacing", "") or sampling.DEFAULT_SPACING["ddim"]
  if name not in timesteps_lib.INTEGER_SPACINGS:
    raise ValueError(f"DDIM inversion runs on integer timesteps: set sampling.spacing to "
                     f"one of {timesteps_lib.INTEGER_SPACINGS} (or '' for uniform).")
  if not 1 <= int(s.num_steps) <= int(config.diffusion.num_timesteps):
    raise ValueError(f"sampling.num_steps={s.num_steps} must be in [1, "
                     f"diffusion.num_timesteps={config.diffusion.num_timesteps}].")
  return timesteps_lib.make_grid(sampling.betas_of(config), int(s.num_steps), name)


def _check(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  s = config.sampling
  num = int(s.get("invert_num_images", 64))
  iterations = int(s.get("invert_fixed_point_iterations", 0))
  if num < 1 or int(s.shard_size) < 1 or int(s.batch_size) < 1:
    raise ValueError(f"sampling.invert_num_images ({num}), sampling.shard_size and "
                     "sampling.batch_size must be positive.")
  if iterations < 0:
    raise ValueError(f"sampling.invert_fixed_point_iterations={iterations} must be >= 0.")
  grid = inversion_grid(config)
  source = str(s.get("invert_source", "") or "")
  if source and not (source.rsplit(":", 1)[0] if ".npz:" in source else source).endswith(
      ".npz"):
    raise ValueError(f"sampling.invert_source={source!r}: give an .npz (path.npz or "
                     "path.npz:key), or '' for data.eval_split.")
  d = config.diffusion
  return {"source": source or f"{config.data.dataset}:{config.data.eval_split}",
          "num_steps": grid.num_steps, "spacing": s.get("spacing", "") or "uniform",
          "timesteps": [int(t) for t in grid.timesteps],
          "fixed_point_iterations": iterations,
          "network_calls_encode": grid.num_steps * (iterations + 1),
          "network_calls_decode": grid.num_steps, "num_timesteps": int(d.num_timesteps),
          "beta_schedule": d.beta_schedule, "beta_start": float(d.beta_start),
          "beta_end": float(d.beta_end), "model_mean_type": d.model_mean_type,
          "model_var_type": d.model_var_type}


def _load_images(config: ml_collections.ConfigDict, num: int) -> np.ndarray:
  """uint8 [N, H, W, C]: the first `num` images of the source."""
  source = str(config.sampling.get("invert_source", "") or "")
  if source:
    images = np.asarray(image_sources.load_npz_images(source, num))
    if images.dtype != np.uint8:
      images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  else:
    ds, available = input_pipeline.eval_dataset(
        config.data, config.data.eval_split, global_batch_size=num, rows=np.arange(num),
        num_images=num)
    images = next(ds.as_numpy_iterator())[0][:min(num, available)]
  size, channels = int(config.data.image_size), int(config.data.channels)
  if images.shape[1:] != (size, size, channels):
    raise ValueError(f"The images to invert are {images.shape[1:]}, the model takes "
                     f"{(size, size, channels)}.")
  return images


def _tag(config: ml_collections.ConfigDict, settings: Dict[str, Any], step: int) -> str:
  source = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(settings["source"]))
  return (f"step{step}_ddim{settings['num_steps']}_{settings['spacing']}"
          f"_fp{settings['fixed_point_iterations']}_{source}_seed{int(config.seed)}")


def make_invert_fn(eval_model: restore.EvalModel, config: ml_collections.ConfigDict,
                   grid: timesteps_lib.Grid, iterations: int):
  """The compiled `run(params, images [B, H, W, C] in [-1, 1]) -> (latents, recons)`."""
  d = config.diffusion
  types = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type)

  def run(params, x0):
    model_fn = eval_model.model_fn(params)
    latents = inversion.encode(model_fn, eval_model.schedule, x0, grid,
                               fixed_point_iterations=iterations, **types)
    return latents, inversion.decode(model_fn, eval_model.schedule, latents, grid, **types)

  mesh = eval_model.mesh
  return jax.jit(run, in_shardings=(sharding.replicated(mesh),
                                    sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=eval_model.jit_options())


def invert_images(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Encodes and decodes the images (resuming); returns and writes the summary."""
  settings = _check(config)  # before the restore
  s = config.sampling
  num, shard_size, batch = int(s.invert_num_images), int(s.shard_size), int(s.batch_size)
  eval_model = restore.load_eval_model(config, workdir)
  sharding.check_batch_divisible(batch, eval_model.mesh, "sampling.batch_size")
  images = _load_images(config, num)
  num = images.shape[0]
  directory = os.path.join(workdir, INVERSIONS_DIR, _tag(config, settings, eval_model.step))
  results.check_manifest(directory, {
      **settings, "step": eval_model.step, "params": eval_model.params_kind,
      "seed": int(config.seed), "shard_size": shard_size,
      "image_shape": list(images.shape[1:])})
  grid = inversion_grid(config)
  run = make_invert_fn(eval_model, config, grid, settings["fixed_point_iterations"])
  table = input_pipeline.PIXEL_VALUES
  start, made = time.time(), 0
  num_shards = -(-num // shard_size)
  for k in range(num_shards):
    lo, hi = k * shard_size, min((k + 1) * shard_size, num)
    path = os.path.join(directory, f"shard_{k:06d}.npz")
    if _shard_size(path) >= hi - lo:
      continue
    latents, recons = [], []
    for first in range(lo, hi, batch):
      rows = np.arange(first, first + batch) % num  # pad with earlier images (dropped)
      out = run(eval_model.params, sharding.put_rows(table[images[rows]], eval_model.mesh))
      take = min(batch, hi - first)
      latents.append(sharding.replicated_value(out[0])[:take])
      recons.append(sharding.replicated_value(out[1])[:take])
    if results.is_writer():
      results.save_npz_atomic(path, images=images[lo:hi],
                              latents=np.concatenate(latents).astype(np.float32),
                              reconstructions=np.concatenate(recons).astype(np.float32),
                              indices=np.arange(lo, hi, dtype=np.int64))
    made += hi - lo
    logging.info("invert: shard %d/%d written, %s", k + 1, num_shards,
                 progress.time_left(made, num - hi, time.time() - start))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("inversion_shards_written")
  summary = {"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
             "num_images": num, "directory": directory, **settings,
             **_errors(directory, num_shards, table, num)}
  if made:
    summary["images_per_second"] = made / max(time.time() - start, 1e-9)
  summary["summary_json"] = results.write_summary(
      workdir, f"invert_{os.path.basename(directory).split('_', 1)[1]}", eval_model.step,
      summary)
  return summary


def _shard_size(path: str) -> int:
  if not os.path.exists(path):
    return 0
  with np.load(path, allow_pickle=False) as data:
    return int(data["indices"].shape[0])


def _errors(directory: str, num_shards: int, table: np.ndarray, num: int) -> Dict[str, Any]:
  """Reconstruction errors and latent statistics over the first `num` images."""
  sq, worst, count, sq_uint8 = 0.0, 0.0, 0, 0.0
  lat_sum, lat_sq, lat_count = 0.0, 0.0, 0
  for k in range(num_shards):
    with np.load(os.path.join(directory, f"shard_{k:06d}.npz"), allow_pickle=False) as data:
      images, recons, latents = data["images"], data["reconstructions"], data["latents"]
    n = min(images.shape[0], num - count)
    images, recons, latents = images[:n], recons[:n], latents[:n]
    diff = recons.astype(np.float64) - table[images].astype(np.float64)
    sq += float(np.sum(diff**2))
    worst = max(worst, float(np.max(np.abs(diff))))
    rounded = image_grid.to_uint8(recons).astype(np.float64)
    sq_uint8 += float(np.sum((rounded - images)**2))
    lat_sum += float(np.sum(latents, dtype=np.float64))
    lat_sq += float(np.sum(np.square(latents, dtype=np.float64)))
    lat_count += latents.size
    count += n
  size = lat_count
  mse_uint8 = sq_uint8 / size
  mean = lat_sum / size
  return {"reconstruction_rms": float(np.sqrt(sq / size)), "reconstruction_max_abs": worst,
          "reconstruction_psnr_uint8": (float("inf") if mse_uint8 == 0 else
                                        float(10 * np.log10(255.0**2 / mse_uint8))),
          "latent_mean": mean,
          "latent_std": float(np.sqrt(max(lat_sq / size - mean**2, 0.0)))}
