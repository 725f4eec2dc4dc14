"""Inpainting job: completions of masked images with any trained model (RePaint).

  python -m diffusion_jax.main --mode=inpaint --config configs/mnist.py:cpu --workdir DIR \\
      --config.inpaint.mask=right_half --config.inpaint.num_images=16

Images: `inpaint.images` (`path.npz[:key]` or a folder of image files; "" = the first
images of `data.eval_split`), the first `inpaint.num_images`, at the model's size and
channels. Masks (1 = known): `inpaint.mask` is a named mask (`left_half`, `right_half`,
`top_half`, `bottom_half`, `center`: the known part is named, e.g. `left_half` keeps the
left half and completes the right), `channels:1,0,0` (those channels known everywhere:
colorization-style), or `path.npz[:key]` / a folder of mask images (white = known), one
per image or one for all. Each image gets `inpaint.num_completions` completions
(`diffusion.repaint.inpaint` with `inpaint.jump_length` and `inpaint.jump_n_sample`).

Completion j of image i is a function of (seed, i, j) only: its key is
`fold_in(fold_in(fold_in(key(seed), streams.INPAINT), i), j)`. The images are done in
batches (`inpaint.batch_size`), each written as a shard
`inpaint/<tag>/shard_<k>.npz` (`completions` uint8 [n, M, H, W, C], `images`, `masks`,
`indices`) once complete, so a killed job resumes at the first missing shard; at the end
a PNG grid (one row per image: the masked input, the completions, the original) and a
JSON summary are written.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import image_grid
from diffusion_jax import progress
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import repaint
from diffusion_jax.evaluation import image_sources
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results

INPAINT_DIR = "inpaint"
NAMED_MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")


def named_mask(name: str, size: int, channels: int) -> np.ndarray:
  """A named mask [S, S, C] of 0/1 (1 = known): see the module docstring."""
  mask = np.zeros((size, size, channels), np.float32)
  half = size // 2
  if name == "left_half":
    mask[:, :half] = 1
  elif name == "right_half":
    mask[:, half:] = 1
  elif name == "top_half":
    mask[:half] = 1
  elif name == "bottom_half":
    mask[half:] = 1
  elif name == "center":  # the border known, the central half of each side unknown
    mask[:] = 1
    lo, hi = size // 4, size - size // 4
    mask[lo:hi, lo:hi] = 0
  elif name.startswith("channels:"):
    values = [float(v) for v in name.split(":", 1)[1].split(",")]
    if len(values) != channels or any(v not in (0.0, 1.0) for v in values):
      raise ValueError(f"inpaint.mask={name!r} needs {channels} comma-separated 0/1 "
                       "values, one per channel (1 = known).")
    mask[:] = np.asarray(values, np.float32)
  else:
    raise ValueError(f"Unknown inpaint.mask {name!r}: use one of {NAMED_MASKS}, "
                     "channels:1,0,0, or path.npz[:key] / a folder of mask images.")
  return mask


def _settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  p = config.inpaint
  out = {"images": str(p.images), "mask": str(p.mask), "num_images": int(p.num_images),
         "num_completions": int(p.num_completions), "jump_length": int(p.jump_length),
         "jump_n_sample": int(p.jump_n_sample), "seed": int(config.seed),
         "clip_denoised": bool(config.sampling.clip_denoised),
         "model_mean_type": config.diffusion.model_mean_type,
         "model_var_type": config.diffusion.model_var_type}
  for name in ("num_images", "num_completions", "jump_length", "jump_n_sample"):
    if out[name] < 1:
      raise ValueError(f"inpaint.{name}={out[name]} must be >= 1.")
  if int(p.batch_size) < 1:
    raise ValueError(f"inpaint.batch_size={p.batch_size} must be >= 1.")
  return out


def _images(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """uint8 [count, S, S, C] images to complete."""
  size, channels = int(config.data.image_size), int(config.data.channels)
  if config.inpaint.images:
    images = np.concatenate(list(image_sources.iterate_images(config.inpaint.images, count)))
  else:
    ds, available = input_pipeline.eval_dataset(
        config.data, config.data.eval_split, global_batch_size=count, rows=np.arange(count))
    if available < count:
      raise ValueError(f"inpaint.num_images={count} but {config.data.eval_split} holds "
                       f"{available} images.")
    images = next(ds.as_numpy_iterator())[0]
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  if images.shape[0] < count or images.shape[1:] != (size, size, channels):
    raise ValueError(f"inpaint.images={config.inpaint.images!r} gives {images.shape[0]} "
                     f"images of shape {images.shape[1:]}; the model needs {count} of "
                     f"{(size, size, channels)}.")
  return images[:count].astype(np.uint8)


def _masks(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """float32 [count, S, S, C] masks of 0/1 (1 = known)."""
  size, channels = int(config.data.image_size), int(config.data.channels)
  spec = str(config.inpaint.mask)
  if spec in NAMED_MASKS or spec.startswith("channels:"):
    return np.broadcast_to(named_mask(spec, size, channels), (count, size, size, channels))
  path = spec.rsplit(":", 1)[0] if ".npz:" in spec else spec
  if not (path.endswith(".npz") or os.path.isdir(path)):
    named_mask(spec, size, channels)  # raises the message naming the choices
  loaded = np.concatenate(list(image_sources.iterate_images(spec, count)))
  if loaded.ndim == 3:
    loaded = loaded[..., None]
  if loaded.shape[1:3] != (size, size) or loaded.shape[-1] not in (1, channels):
    raise ValueError(f"inpaint.mask={spec!r} holds masks of shape {loaded.shape[1:]}; "
                     f"need {size}x{size} with 1 or {channels} channel(s).")
  loaded = np.asarray(loaded, np.float32)
  threshold = 0.5 if loaded.max() <= 1.0 else 127.5  # 0/1 masks, or images (white = known)
  masks = (loaded > threshold).astype(np.float32)
  if not masks.reshape(masks.shape[0], -1).any(axis=1).all():
    raise ValueError(f"inpaint.mask={spec!r}: a mask with no known pixel (1, or white) "
                     "would just sample unconditionally; check the masks.")
  masks = np.broadcast_to(masks, masks.shape[:3] + (channels,))
  if masks.shape[0] == 1:
    return np.broadcast_to(masks, (count,) + masks.shape[1:])
  if masks.shape[0] < count:
    raise ValueError(f"inpaint.mask={spec!r} holds {masks.shape[0]} masks for {count} "
                     "images; give one per image or a single one.")
  return masks[:count]


def make_inpaint_fn(eval_model: restore.EvalModel, config: ml_collections.ConfigDict):
  """The compiled `inpaint(params, known [B, S, S, C], masks, indices [B]) -> [B, M, S, S,
  C]` in [-1, 1] (B divides by the device count; the batch is split over the mesh)."""
  s = _settings(config)
  base = streams.stream_key(config.seed, streams.INPAINT)
  completions = s["num_completions"]

  def run(params, known, masks, indices):
    batch = known.shape[0]
    keys = jax.vmap(lambda i: jax.vmap(lambda j: jax.random.fold_in(
        jax.random.fold_in(base, i), j))(jnp.arange(completions)))(indices)  # [B, M]
    rep = lambda a: jnp.repeat(a, completions, axis=0)  # [B M, ...]
    out = repaint.inpaint(eval_model.model_fn(params), eval_model.schedule, rep(known),
                          rep(masks), keys.reshape(-1), jump_length=s["jump_length"],
                          jump_n_sample=s["jump_n_sample"],
                          model_mean_type=s["model_mean_type"],
                          model_var_type=s["model_var_type"],
                          clip_denoised=s["clip_denoised"])
    return out.reshape((batch, completions) + known.shape[1:])

  mesh = eval_model.mesh
  rows = sharding.batch_sharding(mesh)
  return jax.jit(run, in_shardings=(sharding.replicated(mesh), rows, rows, rows),
                 out_shardings=sharding.replicated(mesh),
                 compiler_options=eval_model.jit_options())


def inpaint_images(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Completes `inpaint.num_images` masked images (resuming); returns the summary."""
  settings = _settings(config)
  num = settings["num_images"]
  images = _images(config, num)
  masks = _masks(config, num)
  eval_model = restore.load_eval_model(config, workdir)
  if eval_model.model.config.num_classes:
    raise ValueError("--mode=inpaint runs unconditional models; this one is "
                     "class-conditional (model.num_classes > 0).")
  mesh = eval_model.mesh
  batch = int(config.inpaint.batch_size)
  batch = -(-batch // mesh.devices.size) * mesh.devices.size
  tag = (f"step{eval_model.step}_{settings['mask'].replace('/', '_').replace(':', '_')}_"
         f"j{settings['jump_length']}r{settings['jump_n_sample']}_seed{settings['seed']}")
  directory = os.path.join(workdir, INPAINT_DIR, tag)
  results.check_manifest(directory, {**settings, "step": eval_model.step,
                                     "params": eval_model.params_kind, "batch_size": batch})
  fn = make_inpaint_fn(eval_model, config)
  known = input_pipeline.PIXEL_VALUES[images]  # [-1, 1]
  num_shards = -(-num // batch)
  start, done = time.time(), 0
  outputs = []
  for k in range(num_shards):
    path = os.path.join(directory, f"shard_{k:06d}.npz")
    lo, hi = k * batch, min((k + 1) * batch, num)
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as shard:
        outputs.append(shard["completions"])
      continue
    idx = np.arange(lo, lo + batch)
    take = np.minimum(idx, num - 1)  # the last batch is padded with the last image
    out = fn(eval_model.params, sharding.put_rows(known[take], mesh),
             sharding.put_rows(np.asarray(masks[take]), mesh),
             sharding.put_rows(idx.astype(np.int32), mesh))
    completed = image_grid.to_uint8(sharding.replicated_value(out)[:hi - lo])
    if results.is_writer():
      results.save_npz_atomic(path, completions=completed, images=images[lo:hi],
                              masks=np.asarray(masks[lo:hi], np.uint8),
                              indices=np.arange(lo, hi))
    outputs.append(completed)
    done += hi - lo
    elapsed = time.time() - start
    logging.info("inpaint: shard %d/%d written, %s", k + 1, num_shards,
                 progress.time_left(done, num - hi, elapsed))
  completions = np.concatenate(outputs)[:num]  # [N, M, S, S, C]
  masked = np.where(np.asarray(masks) > 0, images, 127).astype(np.uint8)  # grey = unknown
  rows = np.concatenate([masked[:, None], completions, images[:, None]], axis=1)
  grid_path = os.path.join(directory, "grid.png")
  if results.is_writer():
    image_grid.save_png(grid_path, image_grid.make_grid(
        rows.reshape((-1,) + rows.shape[2:]), num_cols=rows.shape[1]))
  summary = {"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
             "directory": directory, "grid": grid_path, **settings}
  summary["summary_json"] = results.write_summary(workdir, f"inpaint_{tag.split('_', 1)[1]}",
                                                  eval_model.step, summary)
  return summary
