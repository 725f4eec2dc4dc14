"""Sample generation at scale, in resumable shards of uint8 images.

  python -m diffusion_jax.main --mode=sample --config configs/cifar10.py --workdir DIR \
      [--config.sampling.sampler=dpmpp_2m --config.sampling.num_steps=20]

Any sampler of `sampling.SAMPLERS` (ancestral, respaced, ddim, the DPM-Solvers, euler,
heun) with its grid and options from `config.sampling`; the directory name and the
manifest record them (`sampling.tag`, `sampling.settings`, with the network calls per
sample).

Sample i is a function of (seed, i) only (`sampling.make_sample_fn`), whatever batch or
device computes it. Shard k holds samples [k * shard_size, (k + 1) * shard_size) as
`samples/<tag>/shard_<k>.npz` (`images` uint8 [n, H, W, C] = round((x + 1) * 127.5)
clipped, and `indices`); a shard is written atomically once complete, so a killed job
resumes at the first missing shard and the final set is identical to an uninterrupted
one; asking for more samples later completes a short last shard and adds new ones. The
batch (`sampling.batch_size`, global) is sharded over all devices and hosts; a shard's
last batch is padded with the following indices (computed and dropped), so every call
has one compiled shape.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any, Dict, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from diffusion_jax import image_grid
from diffusion_jax import progress
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results

SAMPLES_DIR = "samples"


def sample_tag(config: ml_collections.ConfigDict, step: int) -> str:
  """The directory name of a sample set, e.g. `step800000_ddim50_eta0.0_seed0`; sets of the
  raw (non-EMA) parameters, `config.eval.use_ema=False`, are `step800000_raw_...`."""
  params = "" if bool(config.eval.get("use_ema", True)) else "raw_"
  return f"step{step}_{params}{sampling.tag(config)}"


def generate_samples(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Generates (or completes) `sampling.num_samples` samples; returns the summary."""
  s = config.sampling
  num, shard_size, batch = int(s.num_samples), int(s.shard_size), int(s.batch_size)
  if num < 1 or shard_size < 1:
    raise ValueError(f"sampling.num_samples ({num}) and sampling.shard_size ({shard_size}) "
                     "must be positive.")
  sampling.check_sampler(config)  # before the restore
  eval_model = restore.load_eval_model(config, workdir)
  sharding.check_batch_divisible(batch, eval_model.mesh, "sampling.batch_size")
  directory = os.path.join(workdir, SAMPLES_DIR, sample_tag(config, eval_model.step))
  image_shape = [int(config.data.image_size)] * 2 + [int(config.data.channels)]
  variances, gamma_digest = analytic_job.sampler_variances(
      config, workdir, eval_model.step, eval_model.params_kind)
  manifest = {**sampling.settings(config), "step": eval_model.step,
              "params": eval_model.params_kind, "shard_size": shard_size,
              "image_shape": image_shape}
  if gamma_digest is not None:
    manifest["analytic_gamma"] = gamma_digest
  results.check_manifest(directory, manifest)
  sample_fn = sampling.make_sample_fn(eval_model.model, eval_model.schedule, config,
                                      eval_model.mesh, eval_model.jit_options(), variances)
  num_shards = -(-num // shard_size)
  start, made = time.time(), 0
  for k in range(num_shards):
    path = shard_path(directory, k)
    lo, hi = k * shard_size, min((k + 1) * shard_size, num)
    kept, kept_seconds = _read_shard(path)  # The last shard of a smaller set may be short.
    if kept is not None and kept.shape[0] >= hi - lo:
      continue
    start_index = lo if kept is None else lo + kept.shape[0]
    shard_start = time.time()
    images = []
    for first in range(start_index, hi, batch):
      indices = np.arange(first, first + batch, dtype=np.int32)
      out = sample_fn(eval_model.params, sharding.put_rows(indices, eval_model.mesh))
      images.append(sharding.replicated_value(out)[:hi - first])
    images = image_grid.to_uint8(np.concatenate(images)[:hi - start_index])
    if kept is not None:
      images = np.concatenate([kept, images])
    seconds = time.time() - shard_start + kept_seconds  # with the kept part's
    if results.is_writer():
      results.save_npz_atomic(path, images=images, indices=np.arange(lo, hi, dtype=np.int64),
                              seconds=np.float64(seconds))
    made += hi - start_index
    elapsed = time.time() - start
    logging.info("samples: shard %d/%d written, %.3f samples/s, %s", k + 1, num_shards,
                 made / max(elapsed, 1e-9), progress.time_left(made, num - hi, elapsed))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("sample_shards_written")
  summary = {"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
             "num_samples": num, "directory": directory, **sampling.settings(config)}
  if made:
    summary["samples_per_second"] = made / max(time.time() - start, 1e-9)
  seconds = sampling_seconds(directory, num_shards)
  if seconds is not None:
    summary["sampling_seconds"] = seconds
  summary["summary_json"] = results.write_summary(
      workdir, f"samples_{sample_tag(config, eval_model.step).split('_', 1)[1]}",
      eval_model.step, summary)
  return summary


def _read_shard(path: str) -> tuple[np.ndarray | None, float]:
  """(images, generation seconds) of a written shard; (None, 0) if it does not exist."""
  if not os.path.exists(path):
    return None, 0.0
  with np.load(path, allow_pickle=False) as data:
    return data["images"], float(data["seconds"]) if "seconds" in data.files else 0.0


def sampling_seconds(directory: str, num_shards: int) -> float | None:
  """Wall time spent generating the first `num_shards` shards of a set, summed over the
  runs that wrote them (each shard stores its own, compilation included); None when a
  shard predates that record."""
  total = 0.0
  for k in range(num_shards):
    with np.load(shard_path(directory, k), allow_pickle=False) as data:
      if "seconds" not in data.files:
        return None
      total += float(data["seconds"])
  return total


def shard_path(directory: str, k: int) -> str:
  """The file of shard k."""
  return os.path.join(directory, f"shard_{k:06d}.npz")


def iterate_samples(directory: str, num: int = -1) -> Iterator[np.ndarray]:
  """Yields the uint8 images of a sample set shard by shard, in index order.

  Raises:
    ValueError: if the shards do not hold consecutive indices from 0 or fewer than
      `num` samples are present.
  """
  files = sorted(glob.glob(os.path.join(directory, "shard_*.npz")))
  expected, remaining = 0, num
  for path in files:
    with np.load(path, allow_pickle=False) as data:
      images, indices = data["images"], data["indices"]
    if indices.size == 0 or indices[0] != expected or np.any(np.diff(indices) != 1):
      raise ValueError(f"{path} starts at sample {indices[:1]} where {expected} is due: "
                       "a shard is missing; rerun the sampling job to complete the set.")
    expected = int(indices[-1]) + 1
    if remaining >= 0:
      images = images[:remaining]
      remaining -= images.shape[0]
    yield images
    if remaining == 0:
      return
  if remaining > 0 or expected == 0:
    raise ValueError(f"{directory} holds {expected} samples, fewer than the {num} asked "
                     "for; rerun the sampling job.")


def load_samples(directory: str, num: int = -1) -> np.ndarray:
  """All (or the first `num`) samples of a set, uint8 [N, H, W, C]."""
  return np.concatenate(list(iterate_samples(directory, num)))

