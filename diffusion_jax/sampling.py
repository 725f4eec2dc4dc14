"""The compiled sampler of every job that samples, and the settings a sample set depends on.

`make_sample_fn` is the one factory used by the training run's sample grids, the sampling
and FID jobs and the figures: `sample(params, indices [B]) -> [B, H, W, C]` in [-1, 1],
one compiled program per batch shape, the indices (hence the work) split over the mesh.
Sample i is a function of (seed, i) only: its key is
`fold_in(fold_in(key(seed), streams.SAMPLE), i)` and the samplers draw all of its noise
from that key (see `diffusion.randomness`), whatever batch or device computes it, so a
killed job resumes to the identical set and a training grid shows samples 0..N-1 of it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import ml_collections
import numpy as np

from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import Schedule

PyTree = Any
SAMPLERS = ("ancestral", "ddim")


def check_sampler(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a sampler setting that cannot run (names the fix)."""
  s, d = config.sampling, config.diffusion
  if s.sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampling.sampler {s.sampler!r}; choose one of {SAMPLERS}.")
  if s.sampler == "ddim" and not 1 <= int(s.num_steps) <= int(d.num_timesteps):
    raise ValueError(f"sampling.num_steps={s.num_steps} must be in [1, "
                     f"diffusion.num_timesteps={d.num_timesteps}] for DDIM.")


def settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The settings a sample set depends on (its manifest, without the checkpoint)."""
  check_sampler(config)
  s, d = config.sampling, config.diffusion
  out = {"sampler": s.sampler, "clip_denoised": bool(s.clip_denoised),
         "seed": int(config.seed), "num_timesteps": int(d.num_timesteps),
         "model_mean_type": d.model_mean_type, "model_var_type": d.model_var_type}
  if s.sampler == "ddim":
    out.update(num_steps=int(s.num_steps), eta=float(s.eta),
               eps_from_clipped_x0=bool(s.eps_from_clipped_x0))
  return out


def tag(config: ml_collections.ConfigDict) -> str:
  """A short name of the sampler settings, e.g. `ddim50_eta0.0_seed0`."""
  s = settings(config)
  name = (f"ddim{s['num_steps']}_eta{s['eta']}" if s["sampler"] == "ddim"
          else f"ancestral{s['num_timesteps']}")
  if s.get("eps_from_clipped_x0"):
    name += "_clippedeps"
  return f"{name}_seed{s['seed']}"


def make_sample_fn(model, schedule: Schedule, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, jit_options: dict | None = None) -> Callable:
  """Returns the compiled `sample(params, indices [B] int32) -> [B, H, W, C]` in [-1, 1].

  Args:
    model: the U-Net module (applied with `train=False`).
    schedule: the diffusion's coefficients.
    config: the experiment config (`sampling`, `diffusion`, `data`, `seed`).
    mesh: the data-parallel mesh; B must divide by its device count (`sample_indices`
      pads any B).
    jit_options: compiler options of the program (`Ops.jit_options()`).

  The indices are split over the mesh; the images come back replicated.
  """
  check_sampler(config)
  s, d = config.sampling, config.diffusion
  shape = (int(config.data.image_size), int(config.data.image_size),
           int(config.data.channels))
  kwargs = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                clip_denoised=bool(s.clip_denoised))
  base = streams.stream_key(config.seed, streams.SAMPLE)
  timesteps = (samplers.ddim_timesteps(int(d.num_timesteps), int(s.num_steps))
               if s.sampler == "ddim" else None)

  def sample(params, indices):
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)  # [B]
    model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
    if timesteps is not None:
      return samplers.ddim_sample(model_fn, schedule, keys, shape, timesteps=timesteps,
                                  eta=float(s.eta),
                                  eps_from_clipped_x0=bool(s.eps_from_clipped_x0), **kwargs)
    return samplers.ancestral_sample(model_fn, schedule, keys, shape, **kwargs)

  return jax.jit(sample, in_shardings=(sharding.replicated(mesh),
                                       sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh), compiler_options=jit_options)


def sample_indices(sample_fn: Callable, params: PyTree, indices: np.ndarray,
                   mesh: jax.sharding.Mesh) -> np.ndarray:
  """Samples `indices` [N] (any N) with `sample_fn`: float32 [N, H, W, C] on this host.

  N is padded to a multiple of the mesh's device count with the following indices
  (computed and dropped).
  """
  indices = np.asarray(indices, np.int32)
  count = indices.shape[0]
  pad = -count % mesh.devices.size
  padded = np.concatenate([indices, indices[-1] + 1 + np.arange(pad, dtype=np.int32)])
  out = sample_fn(params, sharding.put_rows(padded, mesh))
  return sharding.replicated_value(out)[:count]
