r"""Analytic-DPM job: Gamma_t = E ||eps_theta(x_t, t)||^2 / d of a trained model, every t.

  python -m diffusion_jax.main --mode=eval_analytic --config configs/cifar10.py \
      --workdir DIR
      [--config.eval.analytic_num_images=1000 --config.eval.analytic_split=train]

Monte Carlo over the first `eval.analytic_num_images` images of `eval.analytic_split`
(`train` = data.train_split, as Bao et al. 2022 estimate it on training data; `test` =
data.eval_split; or a split string), every image at every timestep (`analytic_dpm.
eps_norm_terms`: one `lax.scan` over T, the global batch sharded over all devices and
hosts). Image i's noise at timestep t is `fold_in(fold_in(fold_in(key(seed),
streams.ANALYTIC), i), t)`, so Gamma is a function of the image indices only. Every
global batch is one chunk, `eval/analytic_<split>_step<step>/batch_<k>.npz` (sums and
sums of squares over its images, [T]), written as soon as it is done; a killed job resumes
at the first missing chunk.

Result: `eval/analytic_<split>_step<step>.npz` with `gamma` [T], its standard error
`gamma_stderr` [T] (over images), and, for the full chain, the clipped optimal variances
`variance` [T] and their bounds `lower`, `upper` [T] (`analytic_dpm.optimal_variance`),
plus a JSON summary. `load_gamma` reads it for the bits/dim job and `chain_variances` gives
the variances of any respaced chain (what `sampling.variance=analytic` needs).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any, Dict, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import progress
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import analytic_dpm
from diffusion_jax.diffusion import schedules
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results


def resolve_split(config: ml_collections.ConfigDict, split: str) -> str:
  """`train` -> data.train_split, `test`/`eval` -> data.eval_split, else `split`."""
  if split in ("test", "eval"):
    return config.data.eval_split
  if split == "train":
    return config.data.train_split
  return split


def _safe(split: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")


def result_path(workdir: str, split: str, step: int) -> str:
  """`eval/analytic_<split>_step<step>.npz` (the split made safe for file names)."""
  return os.path.join(workdir, results.EVAL_DIR, f"analytic_{_safe(split)}_step{step}.npz")


def alphas_cumprod_f64(config: ml_collections.ConfigDict) -> np.ndarray:
  """The float64 alpha_bar [T] of `config.diffusion` (the chains' coefficients)."""
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps),
                                      float(d.beta_start), float(d.beta_end))
  return schedules.schedule_coefficients_f64(betas)["alphas_cumprod"]


def make_gamma_step(eval_model: restore.EvalModel, config: ml_collections.ConfigDict,
                    global_batch: int):
  """The compiled `step(params, images, mask, first_index) -> {sum, sum_sq [T], count}`
  of one chunk (replicated outputs; padding rows are masked out)."""
  d = config.diffusion
  base = streams.stream_key(config.seed, streams.ANALYTIC)
  rows = sharding.batch_sharding(eval_model.mesh)
  t_chunk = int(config.eval.analytic_t_chunk)

  def step(params, images, mask, first_index):  # images [B, H, W, C] in [-1, 1]
    index = jax.lax.with_sharding_constraint(
        first_index + jnp.arange(global_batch, dtype=jnp.int32), rows)  # [B]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
    terms = analytic_dpm.eps_norm_terms(
        eval_model.model_fn(params), eval_model.schedule, images, keys,
        model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
        t_chunk=t_chunk)  # [B, T]
    weight = mask.astype(terms.dtype)[:, None]
    return {"sum": jnp.sum(terms * weight, axis=0),
            "sum_sq": jnp.sum(jnp.square(terms) * weight, axis=0),
            "count": jnp.sum(mask.astype(jnp.int32))}

  return jax.jit(step, out_shardings=sharding.replicated(eval_model.mesh),
                 compiler_options=eval_model.jit_options())


def estimate_gamma(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the Gamma estimation; writes the result file and a summary."""
  e, d = config.eval, config.diffusion
  num_images = int(e.analytic_num_images)
  if num_images < 2:
    raise ValueError(f"eval.analytic_num_images={num_images} must be >= 2 (Gamma's "
                     "standard error needs two images).")
  split = resolve_split(config, e.analytic_split)
  eval_model = restore.load_eval_model(config, workdir)
  global_batch = int(e.analytic_batch_size)
  sharding.check_batch_divisible(global_batch, eval_model.mesh, "eval.analytic_batch_size")
  iterator = input_pipeline.create_eval_iterator(
      config.data, split, global_batch_size=global_batch, sharding=eval_model.mesh,
      num_images=num_images)
  directory = result_path(workdir, split, eval_model.step)[:-len(".npz")]
  settings = {"split": split, "step": eval_model.step, "params": eval_model.params_kind,
              "batch_size": global_batch, "num_images": iterator.num_images,
              "seed": int(config.seed), "num_timesteps": int(d.num_timesteps),
              "beta_schedule": d.beta_schedule, "beta_start": float(d.beta_start),
              "beta_end": float(d.beta_end), "model_mean_type": d.model_mean_type}
  results.check_manifest(directory, settings)
  step_fn = make_gamma_step(eval_model, config, global_batch)
  start, done = time.time(), 0
  for k, (images, mask) in enumerate(iterator):
    path = os.path.join(directory, f"batch_{k:06d}.npz")
    if os.path.exists(path):
      continue
    out = {n: sharding.replicated_value(v) for n, v in
           step_fn(eval_model.params, images, mask, jnp.int32(k * global_batch)).items()}
    if results.is_writer():
      results.save_npz_atomic(path, sum=out["sum"].astype(np.float64),
                              sum_sq=out["sum_sq"].astype(np.float64),
                              count=np.int64(out["count"]))
    done += 1
    eta = progress.time_left(done, iterator.num_batches - k - 1, time.time() - start)
    logging.info("Analytic-DPM Gamma %s: batch %d/%d, %s", split, k + 1,
                 iterator.num_batches, eta)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("analytic_chunks_written")
  gamma, stderr, count = _aggregate(directory, iterator.num_batches, int(d.num_timesteps))
  chain = analytic_dpm.chain_coefficients(alphas_cumprod_f64(config),
                                          np.arange(int(d.num_timesteps)))
  var = analytic_dpm.optimal_variance(chain, gamma)
  path = result_path(workdir, split, eval_model.step)
  if results.is_writer():
    results.save_npz_atomic(path, gamma=gamma, gamma_stderr=stderr,
                            variance=var["variance"], lower=var["lower"],
                            upper=var["upper"], num_images=np.int64(count),
                            params=np.array(settings["params"]), split=np.array(split),
                            seed=np.int64(config.seed))
  clipped = var["variance"] != var["unclipped"]
  summary = {"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
             "split": split, "num_images": count, "result_npz": path,
             "gamma_max_stderr": float(np.max(stderr)), "num_clipped": int(clipped.sum()),
             "gamma_first": float(gamma[0]), "gamma_last": float(gamma[-1])}
  summary["summary_json"] = results.write_summary(workdir, f"analytic_{_safe(split)}",
                                                  eval_model.step, summary)
  return summary


def _aggregate(directory: str, num_batches: int, num_timesteps: int):
  total = np.zeros(num_timesteps, np.float64)
  total_sq = np.zeros(num_timesteps, np.float64)
  count = 0
  for k in range(num_batches):
    path = os.path.join(directory, f"batch_{k:06d}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; rerun the job to compute it.")
    with np.load(path, allow_pickle=False) as data:
      total += data["sum"]
      total_sq += data["sum_sq"]
      count += int(data["count"])
  gamma = total / count
  var = np.maximum(total_sq / count - gamma**2, 0.0) * count / (count - 1)
  return gamma, np.sqrt(var / count), count


def load_gamma(config: ml_collections.ConfigDict, workdir: str, step: int,
               params_kind: str) -> Dict[str, Any]:
  """Reads the analytic job's result for checkpoint `step` (`eval.analytic_split`).

  Raises:
    FileNotFoundError: naming the command that computes it.
    ValueError: when it belongs to other parameters or another T.
  """
  split = resolve_split(config, config.eval.analytic_split)
  path = result_path(workdir, split, step)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"The analytic variances need Gamma of checkpoint step {step} ({path} is missing). "
        f"Compute it first with `python -m diffusion_jax.main --mode=eval_analytic "
        f"--config ... --workdir {workdir}` (same --config overrides), or leave "
        f"eval.bpd_analytic False and sampling.variance=model.")
  with np.load(path, allow_pickle=False) as data:
    out = {k: data[k] for k in data.files}
  if str(out["params"]) != params_kind:
    raise ValueError(f"{path} holds Gamma of the {out['params']} parameters, not the "
                     f"{params_kind} ones being evaluated; rerun the analytic job with the "
                     f"same eval.use_ema.")
  if out["gamma"].shape[0] != int(config.diffusion.num_timesteps):
    raise ValueError(f"{path} has Gamma for T={out['gamma'].shape[0]}, the config has "
                     f"T={config.diffusion.num_timesteps}.")
  out["path"] = path
  return out


def chain_variances(config: ml_collections.ConfigDict, gamma: np.ndarray,
                    timesteps: Sequence[int]) -> Dict[str, np.ndarray]:
  """The clipped optimal variances [K] (and bounds) of the chain `timesteps`."""
  chain = analytic_dpm.chain_coefficients(alphas_cumprod_f64(config), timesteps)
  return analytic_dpm.optimal_variance(chain, gamma)


def sampler_variances(config: ml_collections.ConfigDict, workdir: str, step: int,
                      params_kind: str) -> tuple[np.ndarray | None, str | None]:
  """(variances [K], digest of Gamma) for `sampling.variance=analytic`, else (None, None).

  The variances are those of the sampler's chain (`sampling.chain_timesteps`) from the
  stored Gamma of checkpoint `step`; the digest goes into a sample set's manifest.
  """
  from diffusion_jax import sampling  # pylint: disable=g-import-not-at-top
  if str(config.sampling.get("variance", "model")) != "analytic":
    return None, None
  gamma = load_gamma(config, workdir, step, params_kind)
  variances = chain_variances(config, gamma["gamma"],
                              sampling.chain_timesteps(config))["variance"]
  digest = hashlib.sha1(np.asarray(gamma["gamma"], np.float64).tobytes()).hexdigest()[:12]
  return np.asarray(variances, np.float64), digest
