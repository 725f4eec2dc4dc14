"""Respaced ancestral sampling (Nichol & Dhariwal 2021, Section 4): K of the T steps.

For an increasing subsequence s_0 < ... < s_{K-1} of [0, T), the K-step diffusion with
alpha_bar'_k = alpha_bar_{s_k} has betas beta'_k = 1 - alpha_bar'_k / alpha_bar'_{k-1}
(alpha_bar'_{-1} = 1), computed here in float64. Its reverse process is the paper's
ancestral sampler with those betas: the posterior mean at the predicted x_0, the fixed
variances beta'_k ("fixedlarge") or beta-tilde'_k ("fixedsmall"), or a learned variance
("learned_range" interpolates between the respaced ones; "learned" uses the network's log
variance as it is, as improved-diffusion does). The network is called with the original
timestep s_k; a "mean" output (the posterior mean of x_{s_k - 1}) is turned into x_0 by the
original step's posterior. Step k's noise comes from fold_in(keys[b], s_k) and x_T from
fold_in(keys[b], T): with all T steps this is exactly `samplers.ancestral_sample`.

Hook for other reverse variances (e.g. Analytic-DPM): `variances` [K] replaces the
variance of every step k by variances[k] (only k > 0 adds noise).
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
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Respacing(NamedTuple):
  """A K-step diffusion through a subsequence of the original T timesteps.

  Attributes:
    schedule: the K-step `Schedule` (index k is the original timestep timesteps[k]).
    timesteps: [K] int64, the increasing original timesteps s_k.
  """
  schedule: Schedule
  timesteps: np.ndarray


def respaced_betas(betas: np.ndarray, timesteps: Sequence[int]) -> np.ndarray:
  """[K] float64 betas of the diffusion through `timesteps` (increasing ints in [0, T)).

  Raises:
    ValueError: for timesteps that are not strictly increasing ints in [0, T).
  """
  betas = np.asarray(betas, np.float64)
  seq = np.asarray(timesteps)
  if (seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer) or
      seq[0] < 0 or seq[-1] >= betas.size or np.any(np.diff(seq) <= 0)):
    raise ValueError("Respacing needs a non-empty, strictly increasing sequence of ints in "
                     f"[0, {betas.size}), got {seq}.")
  log_abar = np.cumsum(np.log1p(-betas))[seq]
  return -np.expm1(log_abar - np.concatenate([[0.0], log_abar[:-1]]))


def respace(betas: np.ndarray, timesteps: Sequence[int], dtype=jnp.float32) -> Respacing:
  """The K-step diffusion through `timesteps`, its coefficients cast to `dtype`."""
  seq = np.asarray(timesteps)
  new_betas = respaced_betas(betas, seq)
  return Respacing(schedules.make_schedule(new_betas, dtype), seq.astype(np.int64))


def sample(model_fn: ModelFn, schedule: Schedule, respacing: Respacing, keys: jax.Array,
           shape: Sequence[int], *, model_mean_type: str = "eps",
           model_var_type: str = "fixedlarge",
           transform: denoiser.X0Transform = denoiser.X0Transform(clip=True),
           variances: jax.Array | None = None, trajectory: bool = False) -> jax.Array:
  """Ancestral sampling over the K steps of `respacing` (one `lax.fori_loop`).

  Args:
    model_fn: `model_fn(x_t [B, H, W, C], t [B] int32) -> [B, H, W, C or 2C]`.
    schedule: the original T-step diffusion (the compute dtype, T, and the conversion of
      a "mean" output, the posterior mean of one original step).
    respacing: the K-step diffusion (`respace`), in the same dtype.
    keys: [B] PRNG keys, one per sample.
    shape: the per-sample shape (H, W, C).
    model_mean_type, model_var_type: the network's parameterization.
    transform: clipping (the default, as the paper) / dynamic thresholding of x_0.
    variances: optional [K] reverse variances replacing the variance type's.
    trajectory: also return x_T and the sample after every step.

  Returns:
    [B, H, W, C] samples in the schedule's dtype; with `trajectory`, [K + 1, B, H, W, C]:
    x_T, then the sample after each step (the last is the sample).
  """
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  denoiser.check_x0_transform(transform)
  small = respacing.schedule
  num_steps = small.num_timesteps
  seq = np.asarray(respacing.timesteps)
  if seq.shape != (num_steps,) or seq[-1] >= schedule.num_timesteps:
    raise ValueError(f"The respacing's {seq.size} timesteps do not fit its {num_steps}-"
                     f"step schedule or the {schedule.num_timesteps}-step diffusion.")
  if small.dtype != schedule.dtype:
    raise ValueError(f"The respaced schedule is {small.dtype}, the diffusion's "
                     f"{schedule.dtype}; build it with respace(..., dtype=schedule.dtype).")
  if variances is not None:
    variances = jnp.asarray(variances, schedule.dtype)
    if variances.shape != (num_steps,):
      raise ValueError(f"variances must have shape [{num_steps}], got {variances.shape}.")
  keys = randomness.as_key_array(keys)
  seq_j = jnp.asarray(seq, jnp.int32)
  x = samplers.initial_noise(schedule, keys, shape)

  def body(i, carry):
    x, states = carry
    k = num_steps - 1 - i
    k_b = jnp.full((x.shape[0],), k, dtype=jnp.int32)
    t_b = jnp.full((x.shape[0],), seq_j[k], dtype=jnp.int32)
    out = model_fn(x, t_b)
    mean_out, var_out = process.split_model_output(out, x, model_var_type)
    _, log_variance = process.model_variance(small, var_out, x, k_b, model_var_type)
    if variances is not None:
      log_variance = jnp.broadcast_to(jnp.log(variances[k]), x.shape)
    if model_mean_type == "mean":
      # The output is the mean of x_{s_k - 1}: invert the original step's posterior; the
      # step to x_{s_{k-1}} is the respaced posterior at that x_0 (as p_mean_variance,
      # the transform does not enter the mean of a "mean" model).
      x0 = process.predict_xstart_from_mean(schedule, x, t_b, mean_out)
      mean = process.q_posterior_mean_variance(small, x0, x, k_b)[0]
    else:
      x0, _ = process.predict_xstart_and_eps(small, mean_out, x, k_b,
                                             model_mean_type=model_mean_type)
      mean = process.q_posterior_mean_variance(
          small, denoiser.apply_x0_transform(x0, transform), x, k_b)[0]
    noise = randomness.per_example_normal(keys, seq_j[k], x.shape[1:], x.dtype)
    x_prev = (mean + jnp.where(k > 0, jnp.exp(0.5 * log_variance) * noise, 0.0)).astype(
        x.dtype)
    return x_prev, dpm_solver.record(states, i + 1, x_prev)

  states = dpm_solver.record(dpm_solver.new_trajectory(x, num_steps, trajectory), 0, x)
  x, states = jax.lax.fori_loop(0, num_steps, body, (x, states))
  return states if trajectory else x
