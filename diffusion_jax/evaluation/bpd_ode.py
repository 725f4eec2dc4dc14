"""The bits/dim job's ODE part: probability-flow ODE bits/dim with uniform dequantization.

Each test image x (uint8) is dequantized as score_sde does, z = 2 (x + u) / 256 - 1 with
u ~ U[0, 1)^d, and log p(z) is computed by `ode_likelihood.log_likelihood` (the
continuous-time view of the discrete model; divergence exact or by Hutchinson's
estimate; an adaptive diffrax solve per image, the batch sharded over all devices and
hosts); bits/dim = -log p(z) / (d ln 2) + 7, an upper bound on the discrete data's
bits/dim in expectation over u, comparable with score_sde's figures. Image i draws u from
fold_in(k_i, 0) and its probes from fold_in(k_i, 1), k_i = fold_in(fold_in(key(seed),
streams.ODE), i): a function of the image index only.

The network runs with the pure-JAX operations (`ops.XLA`) here, whatever the kernel
policy: the solve vmaps the network over images and differentiates it, which the CPU
backend's compiled kernels do not provide.

Chunk files `eval/bpd_<split>_step<step>_ode/batch_<k>.npz`: per image `ode_bpd`,
`density_bpd` (-log p(z) / (d ln 2), without the offset), `delta_logp` [n, P] and
`num_steps`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import ode_likelihood
from diffusion_jax.diffusion import schedules
from diffusion_jax.evaluation import restore
from diffusion_jax.training import run_setup

DEQUANTIZATION = "uniform, z = 2 (x + u) / 256 - 1, u ~ U[0, 1)^d (score_sde)"


def settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The ODE settings (manifest entries), checked.

  Raises:
    ValueError: for unknown names, bad tolerances or the "mean" parameterization.
  """
  e = config.eval
  out = {"ode_trace": str(e.ode_trace), "ode_num_probes": int(e.ode_num_probes),
         "ode_solver": str(e.ode_solver), "ode_rtol": float(e.ode_rtol),
         "ode_atol": float(e.ode_atol), "ode_t_min": float(e.ode_t_min),
         "ode_max_steps": int(e.ode_max_steps), "ode_dequantization": DEQUANTIZATION}
  ode_likelihood.check_settings(out["ode_trace"], out["ode_num_probes"], out["ode_solver"],
                                out["ode_rtol"], out["ode_atol"], out["ode_t_min"])
  if config.diffusion.model_mean_type == "mean":
    raise ValueError("eval.bpd_ode needs a noise, x_0 or v prediction; model_mean_type="
                     "'mean' has no continuous-time counterpart. Set eval.bpd_ode=False.")
  if out["ode_trace"] == "exact":
    out["ode_num_probes"] = 1
  return out


def make_step(eval_model: restore.EvalModel, config: ml_collections.ConfigDict,
              global_batch: int):
  """The compiled `step(params, images, mask, first_index) -> dict` of the ODE part
  (replicated outputs: per image `ode_bpd`, `density_bpd`, `delta_logp` [B, P],
  `num_steps`, `success`)."""
  s, d = settings(config), config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps),
                                      float(d.beta_start), float(d.beta_end))
  vp = ode_likelihood.vp_time(betas)
  model = (eval_model.model if eval_model.ops.name == ops_lib.XLA.name
           else run_setup.build_model(config, ops_lib.XLA))
  base = streams.stream_key(config.seed, streams.ODE)
  rows = sharding.batch_sharding(eval_model.mesh)
  image_shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  dim = math.prod(image_shape)
  label_scale = float(d.num_timesteps - 1)

  def step(params, images, mask, first_index):  # images [B, H, W, C] in [-1, 1]
    del mask
    index = jax.lax.with_sharding_constraint(
        first_index + jnp.arange(global_batch, dtype=jnp.int32), rows)  # [B]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
    levels = jnp.round((images.astype(jnp.float32) + 1.0) * 127.5)  # [B, H, W, C]
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0), image_shape)
                 )(keys)
    z = ode_likelihood.dequantize(levels, u)
    probes = None
    if s["ode_trace"] != "exact":
      probes = jax.vmap(lambda k: ode_likelihood.probes(
          jax.random.fold_in(k, 1), s["ode_trace"], s["ode_num_probes"], image_shape,
          jnp.float32))(keys)  # [B, P, H, W, C]

    def eps_fn(x, label):
      out = model.apply({"params": params}, x, label, train=False)
      log_abar = ode_likelihood.log_alpha_bar_at(vp, label / label_scale)
      return ode_likelihood.eps_from_output(
          out, x, log_abar.reshape((-1,) + (1,) * (x.ndim - 1)),
          model_mean_type=d.model_mean_type, model_var_type=d.model_var_type)

    res = ode_likelihood.log_likelihood(
        eps_fn, vp, z, probes, trace=s["ode_trace"], solver=s["ode_solver"],
        rtol=s["ode_rtol"], atol=s["ode_atol"], t_min=s["ode_t_min"],
        max_steps=s["ode_max_steps"])
    return {"ode_bpd": ode_likelihood.bits_per_dim(res["logp"], dim),
            "density_bpd": -res["logp"] / (dim * math.log(2.0)),
            "delta_logp": res["delta_logp"], "num_steps": res["num_steps"],
            "success": res["success"]}

  return jax.jit(step, out_shardings=sharding.replicated(eval_model.mesh),
                 compiler_options=eval_model.jit_options())


def chunk_arrays(out: Dict[str, np.ndarray], count: int, first_index: int
                 ) -> Dict[str, np.ndarray]:
  """The real rows of a chunk's outputs.

  Raises:
    ValueError: when the solver gave up on an image (nothing is written).
  """
  failed = np.flatnonzero(~out["success"][:count])
  if failed.size:
    raise ValueError(
        f"The ODE solver did not reach t = 1 for images {(failed + first_index).tolist()} "
        "within eval.ode_max_steps steps; raise eval.ode_max_steps or loosen "
        "eval.ode_rtol/ode_atol. Chunks already written are kept.")
  arrays = {n: np.asarray(out[n][:count]) for n in
            ("ode_bpd", "density_bpd", "delta_logp", "num_steps")}
  arrays["count"] = np.int64(count)
  return arrays


def summarize(directory: str, num_batches: int) -> Dict[str, Any]:
  """The mean ODE bits/dim, its standard error, the density part and solver steps."""
  parts: Dict[str, list] = {"ode_bpd": [], "density_bpd": [], "num_steps": []}
  for b in range(num_batches):
    path = os.path.join(directory, f"batch_{b:06d}.npz")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; rerun the job to compute it.")
    with np.load(path, allow_pickle=False) as data:
      for name in parts:
        parts[name].append(data[name].astype(np.float64))
  values = {k: np.concatenate(v) for k, v in parts.items()}
  n = values["ode_bpd"].shape[0]
  return {"ode_bpd": float(values["ode_bpd"].mean()),
          "ode_bpd_stderr": float(values["ode_bpd"].std(ddof=1) / np.sqrt(n))
          if n > 1 else 0.0,
          "ode_density_bpd": float(values["density_bpd"].mean()),
          "ode_offset_bpd": ode_likelihood.DEQUANTIZATION_OFFSET_BPD,
          "ode_mean_solver_steps": float(values["num_steps"].mean()),
          "ode_num_images": n}
