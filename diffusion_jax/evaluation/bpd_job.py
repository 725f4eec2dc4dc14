"""Bits/dim job: the full variational bound over all T steps for every image of a split.

  python -m diffusion_jax.main --mode=eval_bpd --config configs/cifar10.py --workdir DIR
      [--config.eval.bpd_split=train]   # the train split, for the train/test gap

Every global batch of the split (in its stored order, `input_pipeline.create_eval_iterator`)
is one chunk: the bound of each image is computed on device (`bound.calc_bpd`: one
`lax.scan` over the T timesteps, the batch sharded over all devices and hosts), and the
chunk's results are written to `eval/bpd_<split>_step<step>/batch_<k>.npz` as soon as they
are done. A killed job resumes at the first missing chunk. The noise of image i comes from
`fold_in(fold_in(key(seed), streams.BPD), i)`, so every number is a function of the image
index only: independent of the batch size, the devices and the restarts.

Results: total bits/dim (the NLL bound), its prior (L_T), decoder (L_0) and KL (rate)
parts; the rate-distortion table of the paper's Table 4 (every T/10 reverse steps: the
rate is the bits received so far, L_T + sum_{s >= t} L_s, and the distortion the RMSE on
[0, 255] of the x_0 predicted from x_t, root of the mean over images and pixels) as CSV,
the full curves as CSV and a plot (Fig. 5), and a JSON summary.

Optional parts, in the same summary, each with its own chunk directory and manifest (so
turning one on later reuses the chunks of the others):
  * `eval.bpd_analytic` / `eval.bpd_chain_steps`: the bound with Analytic-DPM variances
    for T steps and the bounds of K-step chains (`bpd_chains`; needs `--mode=
    eval_analytic` first for the analytic variances);
  * `eval.bpd_ode`: probability-flow ODE bits/dim with uniform dequantization
    (`bpd_ode`).
Which likelihood is which: the VLB and the chain bounds are bounds on the discrete
(256-level) data's negative log-likelihood with the discretized Gaussian decoder; the
ODE figure is an upper bound on it through uniform dequantization (+7 bits/dim offset,
reported). All are for `eval.bpd_split` (the test split by default, as the papers).
"""

from __future__ import annotations

import csv
import os
import re
import time
from typing import Any, Dict, List

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import progress
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import bound
from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import bpd_chains
from diffusion_jax.evaluation import bpd_ode
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results

_PER_IMAGE = ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd")


def _bpd_settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return {"clip_denoised": bool(config.eval.get("bpd_clip_denoised", True)),
          "t_chunk": int(config.eval.get("bpd_t_chunk", 1))}


def make_bpd_step(eval_model: restore.EvalModel, config: ml_collections.ConfigDict,
                  global_batch: int):
  """Returns the compiled `step(params, images, mask, first_index) -> dict` of one chunk.

  Outputs (replicated): the per-image parts [B] and, over the real rows of the batch,
  the sums of the per-timestep terms `terms_sum` [T], of the x_0 MSEs `mse_sum` [T] and
  the row count `count`.
  """
  d = config.diffusion
  settings = _bpd_settings(config)
  base = streams.stream_key(config.seed, streams.BPD)
  rows = sharding.batch_sharding(eval_model.mesh)

  def step(params, images, mask, first_index):  # images [B, H, W, C] in [-1, 1]
    index = jax.lax.with_sharding_constraint(
        first_index + jnp.arange(global_batch, dtype=jnp.int32), rows)  # [B]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
    out = bound.calc_bpd(eval_model.model_fn(params), eval_model.schedule, images, keys,
                         model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                         clip_denoised=settings["clip_denoised"],
                         t_chunk=settings["t_chunk"])
    weight = mask.astype(jnp.float32)  # [B]
    result = {k: out[k] for k in _PER_IMAGE}
    result["terms_sum"] = jnp.sum(out["terms_bpd"] * weight[:, None], axis=0)  # [T]
    result["mse_sum"] = jnp.sum(out["mse"] * weight[:, None], axis=0)  # [T]
    result["count"] = jnp.sum(weight)
    return result

  return jax.jit(step, out_shardings=sharding.replicated(eval_model.mesh),
                 compiler_options=eval_model.jit_options())


def job_name(split: str) -> str:
  """`bpd_<split>` with the split made safe for file names (`test[:10%]` -> `test_10`)."""
  return "bpd_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", split).strip("_")


def chunk_dir(workdir: str, split: str, step: int) -> str:
  """The directory of the per-batch results of `split` at checkpoint `step`."""
  return os.path.join(workdir, results.EVAL_DIR, f"{job_name(split)}_step{step}")


def evaluate_bpd(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the bits/dim job on `config.eval.bpd_split`; returns the summary."""
  split = analytic_job.resolve_split(config, config.eval.bpd_split)
  use_ode = bool(config.eval.get("bpd_ode", False))
  ode_settings = bpd_ode.settings(config) if use_ode else {}  # checked before the restore
  bpd_chains.chain_steps(config)
  eval_model = restore.load_eval_model(config, workdir)
  global_batch = int(config.eval.bpd_batch_size)
  sharding.check_batch_divisible(global_batch, eval_model.mesh, "eval.bpd_batch_size")
  iterator = input_pipeline.create_eval_iterator(
      config.data, split, global_batch_size=global_batch, sharding=eval_model.mesh,
      num_images=int(config.eval.bpd_num_images))
  directory = chunk_dir(workdir, split, eval_model.step)
  d = config.diffusion
  manifest = {"split": split, "step": eval_model.step, "params": eval_model.params_kind,
              "batch_size": global_batch, "num_images": iterator.num_images,
              "seed": int(config.seed), "num_timesteps": int(d.num_timesteps),
              "model_mean_type": d.model_mean_type, "model_var_type": d.model_var_type,
              **_bpd_settings(config)}
  # part -> (chunk directory, manifest, make the compiled step, chunk arrays of its
  # outputs: (out, count, first_index) -> arrays).
  parts = {}
  chains = None
  if bpd_chains.chain_steps(config):
    chains = bpd_chains.prepare(config, workdir, eval_model)
    parts["chains"] = (directory + "_chains", {**manifest, **chains["manifest"]},
                       lambda: bpd_chains.make_step(eval_model, config, global_batch,
                                                    chains),
                       lambda out, n, first: bpd_chains.chunk_arrays(out, n))
  if use_ode:
    parts["ode"] = (directory + "_ode", {**manifest, **ode_settings},
                    lambda: bpd_ode.make_step(eval_model, config, global_batch),
                    bpd_ode.chunk_arrays)
  results.check_manifest(directory, manifest)
  for part_dir, part_manifest, _, _ in parts.values():
    results.check_manifest(part_dir, part_manifest)
  steps = {"vlb": make_bpd_step(eval_model, config, global_batch)}
  start, done_batches = time.time(), 0
  for k, (images, mask) in enumerate(iterator):
    first = k * global_batch
    count = min(global_batch, iterator.num_images - first)  # the real rows (mask)
    path = os.path.join(directory, f"batch_{k:06d}.npz")
    did = False
    if not os.path.exists(path):
      out = {name: sharding.replicated_value(v) for name, v in
             steps["vlb"](eval_model.params, images, mask, jnp.int32(first)).items()}
      assert int(round(float(out["count"]))) == count
      if results.is_writer():
        results.save_npz_atomic(path, **{n: out[n][:count] for n in _PER_IMAGE},
                                terms_sum=out["terms_sum"].astype(np.float64),
                                mse_sum=out["mse_sum"].astype(np.float64),
                                count=np.int64(count))
      did = True
    for name, (part_dir, _, make, to_arrays) in parts.items():
      part_path = os.path.join(part_dir, f"batch_{k:06d}.npz")
      if os.path.exists(part_path):
        continue
      if name not in steps:
        steps[name] = make()
      out = {n: sharding.replicated_value(v) for n, v in
             steps[name](eval_model.params, images, mask, jnp.int32(first)).items()}
      arrays = to_arrays(out, count, first)
      if results.is_writer():
        results.save_npz_atomic(part_path, **arrays)
      did = True
    if not did:
      continue
    done_batches += 1
    elapsed = time.time() - start
    logging.info("bits/dim %s: batch %d/%d done, %.2f images/s, %s", split, k + 1,
                 iterator.num_batches, done_batches * global_batch / max(elapsed, 1e-9),
                 progress.time_left(done_batches, iterator.num_batches - k - 1, elapsed))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("bpd_chunks_written")
  summary = summarize(directory, iterator.num_batches, int(d.num_timesteps))
  summary.update({"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
                  "split": split, "seed": int(config.seed), **_bpd_settings(config),
                  "likelihood": "VLB of the discrete data (discretized Gaussian decoder, "
                                "256 levels), bits/dim"})
  if chains is not None:
    summary.update(bpd_chains.summarize(directory + "_chains", iterator.num_batches,
                                        chains))
    summary.update(chains["manifest"])
    if "analytic" in chains["manifest"]["variances"]:
      summary["analytic_total_bpd"] = summary[f"chain{int(d.num_timesteps)}_analytic_bpd"]
  if use_ode:
    summary.update(bpd_ode.summarize(directory + "_ode", iterator.num_batches))
    summary.update(ode_settings)
  prefix = directory  # the tables and the plot sit next to the chunk directory
  if results.is_writer():
    write_rate_distortion(prefix, summary)
  summary = {k: v for k, v in summary.items() if k != "curves"}
  summary["files"] = {"table4_csv": prefix + "_table4.csv",
                      "curves_csv": prefix + "_curves.csv", "plot": prefix + "_fig5.png"}
  summary["summary_json"] = results.write_summary(workdir, job_name(split),
                                                  eval_model.step, summary)
  return summary


def summarize(directory: str, num_batches: int, num_timesteps: int) -> Dict[str, Any]:
  """Aggregates the chunk files into means, Table 4 and the full curves.

  Raises:
    FileNotFoundError: if a chunk is missing.
  """
  parts: Dict[str, List[np.ndarray]] = {k: [] for k in _PER_IMAGE}
  terms = np.zeros(num_timesteps, np.float64)
  mse = np.zeros(num_timesteps, np.float64)
  count = 0
  for k in range(num_batches):
    path = os.path.join(directory, f"batch_{k:06d}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; rerun the job to compute it.")
    with np.load(path, allow_pickle=False) as data:
      for name in _PER_IMAGE:
        parts[name].append(data[name])
      terms += data["terms_sum"]
      mse += data["mse_sum"]
      count += int(data["count"])
  per_image = {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}
  summary: Dict[str, Any] = {k: float(np.mean(v)) for k, v in per_image.items()}
  summary["num_images"] = count
  summary["total_bpd_stderr"] = float(np.std(per_image["total_bpd"], ddof=1) /
                                      np.sqrt(count)) if count > 1 else 0.0
  curves = rate_distortion(summary["prior_bpd"], terms / count, mse / count)
  summary["curves"] = curves
  every = max(1, num_timesteps // 10)
  summary["table4"] = [row for row in curves[::-1] if row["reverse_time"] % every == 0]
  return summary


def rate_distortion(prior_bpd: float, terms_bpd: np.ndarray,
                    mse: np.ndarray) -> List[Dict[str, float]]:
  """Rate and distortion at every reverse time T - t + 1 (t = 1..T, the paper's indexing).

  Args:
    prior_bpd: mean L_T.
    terms_bpd: [T] mean L_{t-1} by column t - 1 (column 0 is the decoder L_0).
    mse: [T] mean squared error (on [-1, 1]) of the x_0 predicted from x_t, by column t - 1.

  Returns:
    Rows {reverse_time, t, rate_bpd, distortion_rmse} for reverse_time = 1..T: the rate is L_T + sum of the KL
    terms L_s for s >= t (what the receiver holds when it has x_t); the distortion is the
    RMSE on [0, 255].
  """
  num_timesteps = terms_bpd.shape[0]
  kl = np.concatenate([[0.0], terms_bpd[1:]])  # the decoder term is distortion, not rate
  tail = np.cumsum(kl[::-1])[::-1]  # tail[j] = sum_{s >= j} kl[s]
  rows = []
  for t in range(num_timesteps, 0, -1):
    rate = prior_bpd + (tail[t] if t < num_timesteps else 0.0)
    rows.append({"reverse_time": num_timesteps - t + 1, "t": t, "rate_bpd": float(rate),
                 "distortion_rmse": float(np.sqrt(mse[t - 1]) * 127.5)})
  return rows


def write_rate_distortion(prefix: str, summary: Dict[str, Any]) -> None:
  """Writes `<prefix>_table4.csv`, `<prefix>_curves.csv` and the plot `<prefix>_fig5.png`."""
  fields = ["reverse_time", "t", "rate_bpd", "distortion_rmse"]
  for suffix, rows in (("_table4.csv", summary["table4"]), ("_curves.csv", summary["curves"])):
    tmp = prefix + suffix + ".tmp"
    with open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, prefix + suffix)
  _plot(prefix + "_fig5.png", summary["curves"])


def _plot(path: str, curves: List[Dict[str, float]]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r = np.array([row["reverse_time"] for row in curves])
  rate = np.array([row["rate_bpd"] for row in curves])
  dist = np.array([row["distortion_rmse"] for row in curves])
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  axes[0].plot(r, dist)
  axes[0].set(xlabel="Reverse process steps (T - t + 1)", ylabel="Distortion (RMSE [0, 255])")
  axes[1].plot(r, rate)
  axes[1].set(xlabel="Reverse process steps (T - t + 1)", ylabel="Rate (bits/dim)")
  axes[2].plot(rate, dist)
  axes[2].set(xlabel="Rate (bits/dim)", ylabel="Distortion (RMSE [0, 255])")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)

