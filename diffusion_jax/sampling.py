"""The compiled sampler of every job that samples, and the settings a sample set depends on.

`make_sample_fn` is the one factory used by the training run's sample grids, the sampling
and FID jobs and the figures: `sample(params, indices [B]) -> [B, H, W, C]` in [-1, 1],
one compiled program per batch shape, the indices (hence the work) split over the mesh.
Sample i is a function of (seed, i) only: its key is
`fold_in(fold_in(key(seed), streams.SAMPLE), i)` and the samplers draw all of its noise
from that key (see `diffusion.randomness`), whatever batch or device computes it, so a
killed job resumes to the identical set and a training grid shows samples 0..N-1 of it.

Samplers (`config.sampling.sampler`; `num_steps` is the grid's steps, see
`diffusion.timesteps` for `spacing`, `final_step` and `denoise_to_zero`):
  ancestral            Algorithm 2 over all T steps (num_steps unused).
  respaced             ancestral over num_steps of the T steps with recomputed betas
                       (Nichol & Dhariwal 2021; `diffusion.respacing`).
  ddim                 DDIM with eta (`samplers.ddim_sample`).
  dpmpp_2m, dpmpp_3m   DPM-Solver++ multistep (data prediction; `diffusion.dpm_solver`).
  dpmpp_2s, dpmpp_3s   DPM-Solver++ singlestep.
  dpm_2m, dpm_3m       DPM-Solver multistep (noise prediction).
  dpm_2s, dpm_3s       DPM-Solver singlestep (Lu et al. 2022's DPM-Solver-2 and -3).
  dpmpp_2m_sde         SDE-DPM-Solver++(2M) (Lu et al. 2022b): the reverse SDE, second
                       order multistep, fresh noise at every step.
  euler, heun          Karras et al. 2022's samplers of the probability-flow ODE, with
                       optional churn (`diffusion.karras`).
Network calls per sample: T (ancestral), the grid's steps (respaced, ddim, DPM-Solvers,
euler), 2 x steps - 1 into a noise-free end (heun); `settings` records it.

Reverse variances of the ancestral samplers (`sampling.variance`): "model" (the
network's `diffusion.model_var_type`) or "analytic" (Analytic-DPM, Bao et al. 2022: the
optimal variances of the chain from the model's Gamma_t, computed once by
`--mode=eval_analytic`; for ancestral, over all T steps, and respaced). The caller passes
them (`analytic_variances`).

Class-conditional networks (`model.num_classes` > 0): sample i has the label
`sample_labels(config, i)` (`sampling.labels`: "balanced" = i mod N, one class "3", or a
list "0,1,7" taken in turn), and every sampler uses classifier-free guidance with
`sampling.guidance_scale` (0: unconditional, 1: conditional, > 1: guided;
`diffusion.guidance`), both branches in one batched network call per step.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, Dict

import jax
import ml_collections
import numpy as np

from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import guidance
from diffusion_jax.diffusion import karras
from diffusion_jax.diffusion import respacing
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import timesteps as timesteps_lib
from diffusion_jax.diffusion.schedules import Schedule

PyTree = Any
DPM_SAMPLERS = {  # name: (order, algorithm, method)
    f"{prefix}_{order}{m}": (order, algorithm, method)
    for prefix, algorithm in (("dpmpp", "dpmsolver++"), ("dpm", "dpmsolver"))
    for order in (2, 3) for m, method in (("m", "multistep"), ("s", "singlestep"))}
DPM_SAMPLERS["dpmpp_2m_sde"] = (2, "sde-dpmsolver++", "multistep")
SAMPLERS = ("ancestral", "respaced", "ddim", *sorted(DPM_SAMPLERS), "euler", "heun")
VARIANCES = ("model", "analytic")
DEFAULT_SPACING = {"respaced": "even", "ddim": "uniform", "euler": "karras",
                   "heun": "karras", **{name: "logsnr" for name in DPM_SAMPLERS}}
# Settings shown in a sample set's name only when they differ from these defaults.
_EXTRA_DEFAULTS = {"final_step": "zero", "denoise_to_zero": False, "clip_denoised": True,
                   "threshold_ratio": 0.0, "threshold_max": 1.0, "solver_type": "midpoint",
                   "lower_order_final": True, "churn": 0.0, "karras_rho": 7.0,
                   "labels": "balanced"}


def _get(s: ml_collections.ConfigDict, name: str, default):
  return s.get(name, default) if hasattr(s, "get") else getattr(s, name, default)


def spacing(config: ml_collections.ConfigDict) -> str:
  """The timestep spacing the sampler uses (`sampling.spacing`, or its default)."""
  s = config.sampling
  return str(_get(s, "spacing", "") or DEFAULT_SPACING.get(s.sampler, ""))


def betas_of(config: ml_collections.ConfigDict) -> np.ndarray:
  """[T] float64 betas of `config.diffusion`."""
  d = config.diffusion
  return schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps),
                                     float(d.beta_start), float(d.beta_end))


def x0_transform(config: ml_collections.ConfigDict) -> denoiser.X0Transform:
  """Clipping and dynamic thresholding of the predicted x_0 (`sampling`)."""
  s = config.sampling
  return denoiser.X0Transform(clip=bool(s.clip_denoised),
                              threshold_ratio=float(_get(s, "threshold_ratio", 0.0)),
                              threshold_max=float(_get(s, "threshold_max", 1.0)))


def make_grid(config: ml_collections.ConfigDict) -> timesteps_lib.Grid:
  """The sampler's timestep grid (not for ancestral)."""
  s = config.sampling
  return timesteps_lib.make_grid(
      betas_of(config), int(s.num_steps), spacing(config),
      final_step=str(_get(s, "final_step", "zero")),
      denoise_to_zero=bool(_get(s, "denoise_to_zero", False)),
      rho=float(_get(s, "karras_rho", timesteps_lib.KARRAS_RHO)))


def check_sampler(config: ml_collections.ConfigDict) -> timesteps_lib.Grid | None:
  """Raises ValueError for a sampler setting that cannot run (names the fix).

  Returns:
    The sampler's grid (None for ancestral).
  """
  s, d = config.sampling, config.diffusion
  if s.sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampling.sampler {s.sampler!r}; choose one of {SAMPLERS}.")
  denoiser.check_x0_transform(x0_transform(config))
  variance = str(_get(s, "variance", "model"))
  if variance not in VARIANCES:
    raise ValueError(f"Unknown sampling.variance {variance!r}; choose one of {VARIANCES}.")
  if variance == "analytic" and s.sampler not in ("ancestral", "respaced"):
    raise ValueError("sampling.variance=analytic is for the ancestral samplers: use "
                     "sampler=ancestral or respaced (or variance=model).")
  if num_classes(config):
    label_list(config)
    if float(_get(s, "guidance_scale", 1.0)) < 0:
      raise ValueError(f"sampling.guidance_scale={s.guidance_scale} must be >= 0 (0: "
                       "unconditional, 1: conditional, > 1: guided).")
  if float(_get(s, "karras_rho", timesteps_lib.KARRAS_RHO)) <= 0:
    raise ValueError(f"sampling.karras_rho={s.karras_rho} must be > 0 (Karras et al.: 7).")
  if s.sampler == "ancestral":
    if float(_get(s, "threshold_ratio", 0.0)) > 0:
      raise ValueError("sampling.threshold_ratio (dynamic thresholding) is not implemented "
                       "for ancestral; use sampler=respaced with num_steps=T (the same "
                       "sampler, same keys) or set sampling.threshold_ratio=0.")
    return None
  num_t = int(d.num_timesteps)
  if not 1 <= int(s.num_steps) <= num_t:
    raise ValueError(f"sampling.num_steps={s.num_steps} must be in [1, "
                     f"diffusion.num_timesteps={num_t}] for {s.sampler}.")
  name = spacing(config)
  if name not in timesteps_lib.SPACINGS:
    raise ValueError(f"Unknown sampling.spacing {name!r}; choose one of "
                     f"{timesteps_lib.SPACINGS} (or '' for the sampler's default).")
  final = str(_get(s, "final_step", "zero"))
  if s.sampler in ("ddim", "respaced"):
    if name not in timesteps_lib.INTEGER_SPACINGS:
      raise ValueError(f"sampling.sampler={s.sampler} needs integer timesteps: set "
                       f"sampling.spacing to one of {timesteps_lib.INTEGER_SPACINGS}.")
    if final != "zero" or bool(_get(s, "denoise_to_zero", False)):
      raise ValueError(f"sampling.sampler={s.sampler} ends noise-free: set "
                       "sampling.final_step=zero and sampling.denoise_to_zero=False (a "
                       "grid ending at t = 0 is for the ODE samplers).")
  if s.sampler == "ddim" and float(_get(s, "threshold_ratio", 0.0)) > 0:
    raise ValueError("sampling.threshold_ratio (dynamic thresholding) is not implemented "
                     "for ddim; use an ODE solver (e.g. dpmpp_2m) or set "
                     "sampling.threshold_ratio=0.")
  if _get(s, "solver_type", "midpoint") not in dpm_solver.SOLVER_TYPES:
    raise ValueError(f"Unknown sampling.solver_type {s.solver_type!r}; choose one of "
                     f"{dpm_solver.SOLVER_TYPES}.")
  if (s.sampler in DPM_SAMPLERS or s.sampler in ("euler", "heun")) and \
      d.model_mean_type == "mean" and name not in timesteps_lib.INTEGER_SPACINGS:
    raise ValueError("diffusion.model_mean_type=mean works only on integer timesteps: set "
                     f"sampling.spacing to one of {timesteps_lib.INTEGER_SPACINGS}.")
  grid = make_grid(config)
  if s.sampler in DPM_SAMPLERS:
    order, algorithm, method = DPM_SAMPLERS[s.sampler]
    dpm_solver.update_coefficients(grid, order=order, algorithm=algorithm, method=method,
                                   solver_type=str(_get(s, "solver_type", "midpoint")),
                                   lower_order_final=bool(_get(s, "lower_order_final",
                                                               True)))
  if s.sampler in ("euler", "heun"):
    _churn(config, grid)
  return grid


def _churn(config: ml_collections.ConfigDict, grid: timesteps_lib.Grid):
  s = config.sampling
  if float(_get(s, "churn", 0.0)) == 0:
    return None
  return karras.make_churn(betas_of(config), grid, float(s.churn),
                           float(_get(s, "churn_tmin", 0.0)),
                           float(_get(s, "churn_tmax", math.inf)),
                           float(_get(s, "churn_noise", 1.0)))


def num_classes(config: ml_collections.ConfigDict) -> int:
  """Classes of a class-conditional network (0: unconditional)."""
  return int(config.model.get("num_classes", 0))


def label_list(config: ml_collections.ConfigDict) -> np.ndarray | None:
  """The class list of `sampling.labels` (None: balanced over all classes).

  Raises:
    ValueError: a malformed spec or a class outside [0, num_classes).
  """
  spec = str(_get(config.sampling, "labels", "balanced")).strip()
  if spec in ("", "balanced"):
    return None
  try:
    classes = np.asarray([int(v) for v in spec.split(",")], np.int32)
  except ValueError:
    raise ValueError(f"sampling.labels={spec!r}: use 'balanced', one class ('3') or a "
                     "comma-separated list ('0,1,7').") from None
  count = num_classes(config)
  if classes.size == 0 or classes.min() < 0 or classes.max() >= count:
    raise ValueError(f"sampling.labels={spec!r}: classes must lie in [0, {count}) "
                     f"(model.num_classes={count}).")
  return classes


def sample_labels(config: ml_collections.ConfigDict, indices) -> jax.Array:
  """The class label of each sample index ([B] int32): a function of the index only."""
  indices = jax.numpy.asarray(indices, jax.numpy.int32)
  classes = label_list(config)
  if classes is None:
    return indices % num_classes(config)
  return jax.numpy.asarray(classes)[indices % classes.size]


def network_calls(config: ml_collections.ConfigDict) -> int:
  """Network evaluations per sample of the configured sampler (a guided step's batched
  call on both branches counts as two)."""
  grid = check_sampler(config)
  if grid is None:
    calls = int(config.diffusion.num_timesteps)
  elif config.sampling.sampler == "heun":
    calls = 2 * grid.num_steps - int(grid.noise_free_end)
  else:
    calls = grid.num_steps
  scale = float(_get(config.sampling, "guidance_scale", 1.0))
  return calls * (2 if num_classes(config) and scale not in (0.0, 1.0) else 1)


def settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The settings a sample set depends on (its manifest, without the checkpoint)."""
  check_sampler(config)
  s, d = config.sampling, config.diffusion
  out = {"sampler": s.sampler, "clip_denoised": bool(s.clip_denoised),
         "seed": int(config.seed), "num_timesteps": int(d.num_timesteps),
         "model_mean_type": d.model_mean_type, "model_var_type": d.model_var_type,
         "network_calls": network_calls(config)}
  if num_classes(config):
    out.update(labels=str(_get(s, "labels", "balanced")),
               guidance_scale=float(_get(s, "guidance_scale", 1.0)))
  if str(_get(s, "variance", "model")) != "model":
    out["variance"] = str(s.variance)
  if s.sampler == "ancestral":
    return out
  out.update(num_steps=int(s.num_steps), spacing=spacing(config),
             beta_schedule=d.beta_schedule, beta_start=float(d.beta_start),
             beta_end=float(d.beta_end), final_step=str(_get(s, "final_step", "zero")),
             denoise_to_zero=bool(_get(s, "denoise_to_zero", False)))
  if s.sampler == "ddim":
    out.update(eta=float(s.eta), eps_from_clipped_x0=bool(s.eps_from_clipped_x0))
    return out
  out.update(threshold_ratio=float(_get(s, "threshold_ratio", 0.0)),
             threshold_max=float(_get(s, "threshold_max", 1.0)))
  if s.sampler in DPM_SAMPLERS:
    out.update(solver_type=str(_get(s, "solver_type", "midpoint")),
               lower_order_final=bool(_get(s, "lower_order_final", True)))
  if s.sampler in ("euler", "heun"):
    out.update(churn=float(_get(s, "churn", 0.0)), karras_rho=float(_get(s, "karras_rho",
                                                                         7.0)))
    if out["churn"]:
      out.update(churn_tmin=float(s.churn_tmin), churn_tmax=float(s.churn_tmax),
                 churn_noise=float(s.churn_noise))
  return out


def tag(config: ml_collections.ConfigDict) -> str:
  """A short name of the sampler settings, e.g. `ddim50_eta0.0_seed0`, `dpmpp_2m20_logsnr
  _seed0`, `ancestral1000_fixedsmall_seed0` (the ancestral chains name a reverse variance
  other than the default fixedlarge); settings off their defaults add a hash of all
  settings."""
  s = settings(config)
  if s["sampler"] == "ancestral":
    name = f"ancestral{s['num_timesteps']}"
  elif s["sampler"] == "ddim":
    name = f"ddim{s['num_steps']}_eta{s['eta']}"
    if s["spacing"] != DEFAULT_SPACING["ddim"]:
      name += f"_{s['spacing']}"
  else:
    name = f"{s['sampler']}{s['num_steps']}_{s['spacing']}"
  if s.get("eps_from_clipped_x0"):
    name += "_clippedeps"
  if "guidance_scale" in s:
    name += f"_cfg{s['guidance_scale']:g}"
  if "variance" in s:
    name += f"_{s['variance']}"
  elif s["sampler"] in ("ancestral", "respaced") and s["model_var_type"] != "fixedlarge":
    name += f"_{s['model_var_type']}"  # the chain's variances: e.g. beta-tilde, learned
  if any(key in s and s[key] != value for key, value in _EXTRA_DEFAULTS.items()):
    digest = hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:8]
    name += f"_{digest}"
  return f"{name}_seed{s['seed']}"


def chain_timesteps(config: ml_collections.ConfigDict) -> np.ndarray:
  """The increasing timesteps of an ancestral sampler's chain: all T (ancestral) or the
  respaced grid's."""
  grid = check_sampler(config)
  if grid is None:
    return np.arange(int(config.diffusion.num_timesteps), dtype=np.int64)
  return np.asarray(grid.timesteps[::-1], np.int64)


def build_sampler(config: ml_collections.ConfigDict, schedule: Schedule,
                  analytic_variances: np.ndarray | None = None
                  ) -> Callable[[Callable, jax.Array], jax.Array]:
  """`run(model_fn, keys [B]) -> [B, H, W, C]`: the configured sampler (trace inside jit).

  Args:
    config: the experiment config (`sampling`, `diffusion`, `data`).
    schedule: the diffusion's coefficients (the compute dtype).
    analytic_variances: with `sampling.variance=analytic`, the [K] reverse variances of
      the chain `chain_timesteps(config)` (e.g. `evaluation.analytic_job
      .chain_variances(...)["variance"]`).

  Raises:
    ValueError: analytic variances asked for and not given (or of the wrong length).
  """
  grid = check_sampler(config)
  s, d = config.sampling, config.diffusion
  if str(_get(s, "variance", "model")) == "analytic":
    steps = chain_timesteps(config)
    if analytic_variances is None or np.shape(analytic_variances) != steps.shape:
      raise ValueError(
          f"sampling.variance=analytic needs the chain's {steps.size} Analytic-DPM "
          "variances from Gamma_t: compute Gamma with --mode=eval_analytic first (the "
          "sampling and FID jobs then read it from the workdir).")
    shape = (int(config.data.image_size), int(config.data.image_size),
             int(config.data.channels))
    spaced = respacing.respace(betas_of(config), steps, schedule.dtype)
    variances = np.asarray(analytic_variances, np.float64)
    return lambda model_fn, keys: respacing.sample(
        model_fn, schedule, spaced, keys, shape, model_mean_type=d.model_mean_type,
        model_var_type=d.model_var_type, transform=x0_transform(config),
        variances=variances)
  shape = (int(config.data.image_size), int(config.data.image_size),
           int(config.data.channels))
  types = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type)
  transform = x0_transform(config)
  if s.sampler == "ancestral":
    return lambda model_fn, keys: samplers.ancestral_sample(
        model_fn, schedule, keys, shape, clip_denoised=bool(s.clip_denoised), **types)
  if s.sampler == "ddim":
    seq = np.asarray(grid.timesteps[::-1], np.int64)
    return lambda model_fn, keys: samplers.ddim_sample(
        model_fn, schedule, keys, shape, timesteps=seq, eta=float(s.eta),
        clip_denoised=bool(s.clip_denoised),
        eps_from_clipped_x0=bool(s.eps_from_clipped_x0), **types)
  if s.sampler == "respaced":
    spaced = respacing.respace(betas_of(config), np.asarray(grid.timesteps[::-1], np.int64),
                               schedule.dtype)
    return lambda model_fn, keys: respacing.sample(
        model_fn, schedule, spaced, keys, shape, transform=transform, **types)
  if s.sampler in DPM_SAMPLERS:
    order, algorithm, method = DPM_SAMPLERS[s.sampler]
    options = dict(order=order, algorithm=algorithm, method=method,
                   solver_type=str(_get(s, "solver_type", "midpoint")),
                   lower_order_final=bool(_get(s, "lower_order_final", True)))
    return lambda model_fn, keys: dpm_solver.sample(
        model_fn, schedule, keys, shape, grid, transform=transform, **options, **types)
  churn = _churn(config, grid)
  return lambda model_fn, keys: karras.sample(
      model_fn, schedule, keys, shape, grid, method=s.sampler, churn=churn,
      transform=transform, **types)


def make_sample_fn(model, schedule: Schedule, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, jit_options: dict | None = None,
                   analytic_variances: np.ndarray | None = None) -> Callable:
  """Returns the compiled `sample(params, indices [B] int32) -> [B, H, W, C]` in [-1, 1].

  Args:
    model: the U-Net module (applied with `train=False`).
    schedule: the diffusion's coefficients.
    config: the experiment config (`sampling`, `diffusion`, `data`, `seed`).
    mesh: the data-parallel mesh; B must divide by its device count (`sample_indices`
      pads any B).
    jit_options: compiler options of the program (`Ops.jit_options()`).
    analytic_variances: see `build_sampler`.

  The indices are split over the mesh; the images come back replicated.
  """
  run = build_sampler(config, schedule, analytic_variances)
  base = streams.stream_key(config.seed, streams.SAMPLE)
  classes = num_classes(config)
  scale = float(_get(config.sampling, "guidance_scale", 1.0))

  def sample(params, indices):
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)  # [B]
    if not classes:
      model_fn = lambda x, t: model.apply({"params": params}, x, t, train=False)
      return run(model_fn, keys)
    apply = lambda x, t, y: model.apply({"params": params}, x, t, train=False, y=y)
    model_fn = guidance.guided_model_fn(apply, sample_labels(config, indices), classes,
                                        scale, int(config.data.channels))
    return run(model_fn, keys)

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
