"""The bits/dim job's chain part: the bound of K-step chains and the Analytic-DPM bound.

For every K of `eval.bpd_chain_steps`, and for K = T when `eval.bpd_analytic` is set, the
bound of the chain `analytic_dpm.even_chain(T, K)` (round(linspace(0, T - 1, K)): keeps
L_T and the decoder at t = 1) is computed with the chain's "fixedsmall" and "fixedlarge"
variances and, with `eval.bpd_analytic`, the Analytic-DPM variances from the analytic
job's Gamma (`analytic_job.load_gamma`). One network call per step serves all variances,
and image i's x_t uses the same noise as in the full bound (`streams.BPD`), so the
differences between variances (and, at K = T, with the main bound) are paired.

Chunk files `eval/bpd_<split>_step<step>_chains/batch_<k>.npz` hold, per K, the per-image
totals `k<K>_total` [n, V] and the summed terms `k<K>_terms_sum` [V, K].
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import analytic_dpm
from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import restore


def chain_steps(config: ml_collections.ConfigDict) -> List[int]:
  """The sorted K of the chains to evaluate (empty: no chain part).

  Raises:
    ValueError: for a K outside [1, T].
  """
  num_t = int(config.diffusion.num_timesteps)
  steps = {int(k) for k in config.eval.get("bpd_chain_steps", ())}
  bad = sorted(k for k in steps if not 1 <= k <= num_t)
  if bad:
    raise ValueError(f"eval.bpd_chain_steps has {bad} outside [1, T={num_t}].")
  if config.eval.get("bpd_analytic", False):
    steps.add(num_t)
  return sorted(steps)


def variances(config: ml_collections.ConfigDict) -> List[str]:
  """The variance choices of the chains."""
  analytic = bool(config.eval.get("bpd_analytic", False))
  return ["fixedsmall", "fixedlarge"] + (["analytic"] if analytic else [])


def prepare(config: ml_collections.ConfigDict, workdir: str, eval_model: restore.EvalModel
            ) -> Dict[str, Any]:
  """The chains' log-variances and manifest entries (reads Gamma; fails before work)."""
  gamma, gamma_info = None, {}
  if config.eval.get("bpd_analytic", False):
    data = analytic_job.load_gamma(config, workdir, eval_model.step, eval_model.params_kind)
    gamma = data["gamma"]
    gamma_info = {"gamma_file": data["path"], "gamma_num_images": int(data["num_images"]),
                  "gamma_sha1": hashlib.sha1(gamma.astype(np.float64).tobytes()
                                             ).hexdigest()[:12]}
  abar = analytic_job.alphas_cumprod_f64(config)
  num_t = abar.shape[0]
  names = variances(config)
  chains = {}
  for k in chain_steps(config):
    chain = analytic_dpm.chain_coefficients(abar, analytic_dpm.even_chain(num_t, k))
    chains[k] = (chain, analytic_dpm.chain_log_variances(chain, names, gamma))
  manifest = {"chain_steps": sorted(chains), "variances": names, **gamma_info}
  return {"chains": chains, "manifest": manifest}


def make_step(eval_model: restore.EvalModel, config: ml_collections.ConfigDict,
              global_batch: int, prepared: Dict[str, Any]):
  """The compiled `step(params, images, mask, first_index) -> dict` of the chain part:
  per K, `k<K>_total` [B, V] and `k<K>_terms_sum` [V, K] (replicated)."""
  d = config.diffusion
  base = streams.stream_key(config.seed, streams.BPD)
  rows = sharding.batch_sharding(eval_model.mesh)
  t_chunk = int(config.eval.get("bpd_t_chunk", 1))
  clip = bool(config.eval.get("bpd_clip_denoised", True))

  def step(params, images, mask, first_index):
    index = jax.lax.with_sharding_constraint(
        first_index + jnp.arange(global_batch, dtype=jnp.int32), rows)  # [B]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
    weight = mask.astype(jnp.float32)[:, None, None]
    out = {}
    for k, (chain, log_var) in prepared["chains"].items():
      res = analytic_dpm.chain_bound(
          eval_model.model_fn(params), eval_model.schedule, images, keys, chain, log_var,
          model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
          clip_denoised=clip, t_chunk=math.gcd(k, t_chunk))
      out[f"k{k}_total"] = res["total_bpd"]
      out[f"k{k}_terms_sum"] = jnp.sum(res["terms_bpd"] * weight, axis=0)
    return out

  return jax.jit(step, out_shardings=sharding.replicated(eval_model.mesh),
                 compiler_options=eval_model.jit_options())


def chunk_arrays(out: Dict[str, np.ndarray], count: int) -> Dict[str, np.ndarray]:
  """What a chunk file keeps: the real rows' totals, the float64 sums, the count."""
  arrays = {n: (v[:count] if n.endswith("_total") else v.astype(np.float64))
            for n, v in out.items()}
  arrays["count"] = np.int64(count)
  return arrays


def summarize(directory: str, num_batches: int, prepared: Dict[str, Any]
              ) -> Dict[str, Any]:
  """Per chain and variance: the mean bound, its standard error, and the paired
  differences of the analytic bound with the fixed ones."""
  names = prepared["manifest"]["variances"]
  totals: Dict[int, list] = {k: [] for k in prepared["chains"]}
  for b in range(num_batches):
    path = os.path.join(directory, f"batch_{b:06d}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; rerun the job to compute it.")
    with np.load(path, allow_pickle=False) as data:
      for k in totals:
        totals[k].append(data[f"k{k}_total"].astype(np.float64))
  rows, flat = [], {}
  for k, parts in totals.items():
    total = np.concatenate(parts)  # [N, V]
    n = total.shape[0]
    row: Dict[str, Any] = {"num_steps": k, "num_images": n}
    for v, name in enumerate(names):
      row[f"{name}_bpd"] = float(total[:, v].mean())
      row[f"{name}_bpd_stderr"] = _stderr(total[:, v])
      flat[f"chain{k}_{name}_bpd"] = row[f"{name}_bpd"]
    if "analytic" in names:
      for v, name in enumerate(names[:2]):
        diff = total[:, names.index("analytic")] - total[:, v]
        row[f"analytic_minus_{name}_bpd"] = float(diff.mean())
        row[f"analytic_minus_{name}_bpd_stderr"] = _stderr(diff)
    rows.append(row)
  return {"chains": rows, **flat}


def _stderr(values: np.ndarray) -> float:
  n = values.shape[0]
  return float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
