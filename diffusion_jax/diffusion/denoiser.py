"""The network's predictions of x_0 and eps at any noise level, and what may be done to x_0.

The few-step samplers evaluate the network at levels (alpha, sigma) that need not be
those of an integer timestep (see `timesteps`), so the conversions here take the level
itself: x_t = alpha x_0 + sigma eps, alpha^2 + sigma^2 = 1. Pure functions of arrays.

Predicted-x_0 transforms (`X0Transform`), applied in this order:
  * dynamic thresholding (Saharia et al. 2022, Imagen): per example, s = the `ratio`
    quantile of |x_0| (linear interpolation, as numpy and torch.quantile), clamped to
    [1, max_value]; x_0 -> clip(x_0, -s, s) / s;
  * clipping to [-1, 1] (the official DDPM sampler's; a no-op after thresholding).
When x_0 was changed, eps is re-derived from it so that (x_t, x_0, eps) stay consistent.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.schedules import Schedule


class X0Transform(NamedTuple):
  """What is done to a predicted x_0 before a sampler uses it.

  Attributes:
    clip: clip x_0 to [-1, 1].
    threshold_ratio: dynamic thresholding's quantile in (0, 1], or 0 for none.
    threshold_max: dynamic thresholding's largest s (>= 1).
  """
  clip: bool = False
  threshold_ratio: float = 0.0
  threshold_max: float = 1.0

  @property
  def active(self) -> bool:
    return bool(self.clip or self.threshold_ratio > 0)


def check_x0_transform(transform: X0Transform) -> None:
  """Raises ValueError for thresholding settings out of range."""
  if not 0.0 <= float(transform.threshold_ratio) <= 1.0:
    raise ValueError(f"threshold_ratio must be in [0, 1] (0 = off), got "
                     f"{transform.threshold_ratio}.")
  if float(transform.threshold_max) < 1.0:
    raise ValueError(f"threshold_max must be >= 1, got {transform.threshold_max}.")


def dynamic_threshold(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
  """Imagen's dynamic thresholding of x_0 [B, ...], per example (see the module doc)."""
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.quantile(flat, ratio, axis=1, method="linear")  # [B]
  s = jnp.clip(s, 1.0, max_value).reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def apply_x0_transform(x0: jax.Array, transform: X0Transform) -> jax.Array:
  """Thresholds and/or clips x_0 [B, ...] as `transform` says."""
  if transform.threshold_ratio > 0:
    x0 = dynamic_threshold(x0, float(transform.threshold_ratio),
                           float(transform.threshold_max))
  if transform.clip:
    x0 = jnp.clip(x0, -1.0, 1.0)
  return x0


def predict(model_output: jax.Array, x: jax.Array, alpha, sigma, *, model_mean_type: str,
            model_var_type: str, transform: X0Transform = X0Transform(),
            schedule: Schedule | None = None, t=None):
  """x_0 and eps predicted from a network output at level (alpha, sigma).

  Args:
    model_output: [B, H, W, C], or [B, H, W, 2C] for learned variances (the mean half is
      used, the variance half ignored).
    x: [B, H, W, C] the network input x_t = alpha x_0 + sigma eps.
    alpha, sigma: scalars (or arrays broadcasting against x), sigma > 0.
    model_mean_type: "eps", "x_start", "v" or "mean" (the posterior mean of one discrete
      step; needs `schedule` and integer timesteps `t`).
    model_var_type: one of `process.VAR_TYPES` (decides the output's channels).
    transform: what is done to x_0 (eps is then re-derived from it).
    schedule, t: for model_mean_type "mean" only: the schedule and the int32 timesteps [B].

  Returns:
    (x0 [B, H, W, C], eps [B, H, W, C]).
  """
  process.check_mean_type(model_mean_type)
  mean_output, _ = process.split_model_output(model_output, x, model_var_type)
  if model_mean_type == "eps":
    eps = mean_output
    x0 = (x - sigma * eps) / alpha
  elif model_mean_type == "x_start":
    x0, eps = mean_output, None
  elif model_mean_type == "v":
    x0 = alpha * x - sigma * mean_output
    eps = sigma * x + alpha * mean_output
  else:
    if schedule is None or t is None:
      raise ValueError("model_mean_type 'mean' predicts the posterior mean of one discrete "
                       "step; it needs the schedule and integer timesteps.")
    x0, eps = process.predict_xstart_from_mean(schedule, x, t, mean_output), None
  if transform.active:
    x0, eps = apply_x0_transform(x0, transform), None
  if eps is None:
    eps = (x - alpha * x0) / sigma
  return x0, eps
