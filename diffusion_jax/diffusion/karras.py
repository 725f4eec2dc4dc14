"""Euler and Heun samplers of the probability-flow ODE (Karras et al. 2022, Algorithms 1-2).

Karras et al. write the ODE of a diffusion in its variance-exploding form: with
s = sigma / alpha (the "Karras sigma") and y = x / alpha, dy/ds = (y - D(y; s)) / s where
D is the denoiser, the network's x_0 prediction. The network of a DDPM sees x = y alpha,
alpha = 1 / sqrt(1 + s^2), at the timestep of level s (see `timesteps`). Euler takes one
network call per step; Heun's second-order method adds a corrector at the next level
(no corrector into the noise-free end), so M steps cost 2 M - 1 calls into a noise-free
end, 2 M otherwise. Any `timesteps.Grid` works; Karras et al.'s is the "karras" spacing.

Stochastic churn (Algorithm 2): at a step whose level s_i lies in [s_tmin, s_tmax] the
sample is first raised to s_hat = s_i (1 + gamma), gamma = min(s_churn / M, sqrt(2) - 1),
by adding sqrt(s_hat^2 - s_i^2) s_noise z, and the step starts from s_hat (the network
evaluated at the timestep of s_hat, clamped to T - 1). z of example b at step i comes
from fold_in(keys[b], i). diffusers' EulerDiscreteScheduler applies its churn after the
network call (its D is computed at s_i from the unraised sample), so it is not this
algorithm; with s_churn = 0 the two agree.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import timesteps as timesteps_lib
from diffusion_jax.diffusion.schedules import Schedule
from diffusion_jax.diffusion.timesteps import Grid

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
METHODS = ("euler", "heun")


class Churn(NamedTuple):
  """Per-step churn of Algorithm 2 (host float64).

  Attributes:
    gammas: [M] gamma_i (0 where no noise is added).
    hat_levels: [M] s_hat_i = s_i (1 + gamma_i) (Karras units).
    hat_timesteps: [M] the timesteps of s_hat_i (clamped to [0, T - 1]).
    noise_scale: s_noise.
  """
  gammas: np.ndarray
  hat_levels: np.ndarray
  hat_timesteps: np.ndarray
  noise_scale: float


def make_churn(betas: np.ndarray, grid: Grid, s_churn: float, s_tmin: float = 0.0,
               s_tmax: float = float("inf"), s_noise: float = 1.0) -> Churn:
  """Algorithm 2's churn on `grid`.

  Args:
    betas: [T] float64 betas (to map the raised levels to timesteps).
    grid: the steps.
    s_churn: total churn (>= 0; 0 is the deterministic sampler).
    s_tmin, s_tmax: churn only where s_tmin <= s_i <= s_tmax (Karras units).
    s_noise: the scale of the added noise.

  Raises:
    ValueError: for negative churn or noise scale, or s_tmin > s_tmax.
  """
  if s_churn < 0 or s_noise < 0 or s_tmin > s_tmax:
    raise ValueError(f"Churn needs s_churn >= 0, s_noise >= 0 and s_tmin <= s_tmax; got "
                     f"{s_churn}, {s_noise}, [{s_tmin}, {s_tmax}].")
  levels = grid.karras_sigmas[:-1]
  m = grid.num_steps
  inside = (levels >= s_tmin) & (levels <= s_tmax)
  gammas = np.where(inside, min(s_churn / m, np.sqrt(2.0) - 1.0), 0.0)
  hat = levels * (1.0 + gammas)
  hat_t = np.where(gammas > 0, timesteps_lib.timestep_of_karras_sigma(betas, hat),
                   grid.timesteps)
  return Churn(gammas, hat, hat_t, float(s_noise))


def no_churn(grid: Grid) -> Churn:
  """The deterministic sampler's (empty) churn."""
  m = grid.num_steps
  return Churn(np.zeros(m), grid.karras_sigmas[:-1], grid.timesteps.astype(np.float64), 1.0)


def solve(model_fn: ModelFn, schedule: Schedule, x: jax.Array, grid: Grid, *,
          method: str = "heun", churn: Churn | None = None, keys: jax.Array | None = None,
          model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
          transform: denoiser.X0Transform = denoiser.X0Transform(),
          trajectory: bool = False) -> jax.Array:
  """Runs Euler or Heun over `grid` from x (a DDPM sample at the grid's first level).

  Args:
    model_fn: `model_fn(x [B, H, W, C], t [B]) -> [B, H, W, C or 2C]`.
    schedule: the diffusion's coefficients (its dtype is the compute dtype).
    x: [B, H, W, C] the DDPM sample x_t at timestep grid.timesteps[0].
    grid: the steps; a noisy end needs `grid.end_timestep` for Heun's last corrector.
    method: "euler" or "heun".
    churn: stochastic churn (`make_churn`), or None for the deterministic sampler.
    keys: [B] PRNG keys (needed with churn): step i's noise from fold_in(keys[b], i).
    model_mean_type, model_var_type: the network's parameterization ("mean" needs an
      integer grid and no churn).
    transform: clipping / dynamic thresholding of D (the predicted x_0).
    trajectory: also return the DDPM sample x = y alpha at every level.

  Returns:
    [B, H, W, C] the DDPM sample at the grid's end (x_0 for a noise-free end); with
    `trajectory`, [M + 1, B, H, W, C]: the samples at levels 0 (x) to M (the end).
  """
  if method not in METHODS:
    raise ValueError(f"Unknown Karras sampler {method!r}; choose one of {METHODS}.")
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  denoiser.check_x0_transform(transform)
  dpm_solver.check_grid_timesteps(grid, schedule, model_mean_type)
  churn = no_churn(grid) if churn is None else churn
  churning = bool(np.any(churn.gammas > 0))
  if churning and keys is None:
    raise ValueError("Stochastic churn needs one PRNG key per example (keys).")
  if churning and model_mean_type == "mean":
    raise ValueError("Churn evaluates the network at raised, fractional levels; "
                     "model_mean_type 'mean' needs integer timesteps.")
  heun = method == "heun"
  noise_free = grid.noise_free_end
  end_t = grid.end_timestep
  if heun and not noise_free and not np.isfinite(end_t):
    raise ValueError("Heun's last corrector evaluates the network at the end level; the "
                     "grid does not say its timestep (end_timestep).")
  dtype = schedule.dtype
  integer = grid.integer_timesteps and not churning and (noise_free or
                                                          end_t == np.round(end_t))
  t_dtype = jnp.int32 if integer else dtype
  levels = grid.karras_sigmas  # [M + 1]
  next_t = np.append(grid.timesteps[1:], end_t if np.isfinite(end_t) else 0.0)
  const = lambda a, dt=dtype: jnp.asarray(np.asarray(a, np.float64), dt)
  s_next, hat = const(levels[1:]), const(churn.hat_levels)
  # The std of the added noise, on the host: exactly 0 without churn (on the device,
  # s_hat^2 - s^2 could come out as a rounding residue under fused multiply-adds).
  raise_std = const(np.sqrt(np.maximum(churn.hat_levels**2 - levels[:-1]**2, 0.0)) *
                    churn.noise_scale)
  t_hat = const(churn.hat_timesteps).astype(t_dtype)
  t_next = const(next_t).astype(t_dtype)
  use_corrector = jnp.asarray(heun & (levels[1:] > 0))
  if keys is not None:
    keys = randomness.as_key_array(keys, x.shape[0])

  def denoise(y, s, t):
    alpha = jax.lax.rsqrt(1.0 + s * s)
    t_b = jnp.full((y.shape[0],), t, dtype=t_dtype)
    x0, _ = denoiser.predict(model_fn(y * alpha, t_b), y * alpha, alpha, s * alpha,
                             model_mean_type=model_mean_type, model_var_type=model_var_type,
                             transform=transform, schedule=schedule,
                             t=t_b if model_mean_type == "mean" else None)
    return x0

  to_ddpm = const(1.0 / np.sqrt(1.0 + levels**2))  # [M + 1] alpha of each level

  def body(i, carry):
    y, states = carry
    s_hat = hat[i]
    if churning:
      z = randomness.per_example_normal(keys, i, y.shape[1:], dtype)
      y = y + raise_std[i] * z
    d = (y - denoise(y, s_hat, t_hat[i])) / s_hat
    dt = s_next[i] - s_hat
    y_next = y + dt * d
    if heun:
      s_safe = jnp.where(use_corrector[i], s_next[i], 1.0)

      def corrector(y_next):
        d2 = (y_next - denoise(y_next, s_safe, t_next[i])) / s_safe
        return y + dt * 0.5 * (d + d2)

      y_next = jax.lax.cond(use_corrector[i], corrector, lambda v: v, y_next)
    y_next = y_next.astype(dtype)
    return y_next, dpm_solver.record(states, i + 1, y_next * to_ddpm[i + 1])

  x = jnp.asarray(x).astype(dtype)
  states = dpm_solver.record(dpm_solver.new_trajectory(x, grid.num_steps, trajectory), 0, x)
  y, states = jax.lax.fori_loop(0, grid.num_steps, body, (x / to_ddpm[0], states))
  return states if trajectory else y * to_ddpm[-1]


def sample(model_fn: ModelFn, schedule: Schedule, keys: jax.Array, shape: Sequence[int],
           grid: Grid, **kwargs) -> jax.Array:
  """Euler/Heun samples: x_T ~ N(0, I) from fold_in(keys[b], T), then `solve`.

  Args:
    model_fn, schedule, grid: as `solve`.
    keys: [B] PRNG keys, one per sample (also the churn's).
    shape: the per-sample shape (H, W, C).
    **kwargs: the options of `solve`.

  Returns:
    [B, H, W, C] samples in the schedule's dtype.
  """
  keys = randomness.as_key_array(keys)
  x_T = samplers.initial_noise(schedule, keys, shape)
  return solve(model_fn, schedule, x_T, grid, keys=keys, **kwargs)
