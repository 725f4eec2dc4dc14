"""The Gaussian diffusion of Ho et al. (2020): forward process, posterior, reverse model.

Pure functions of arrays. Conventions:
  * images are NHWC (any rank works: coefficients broadcast over all but the first axis);
  * `t` is an int32 array of shape [B] (or a scalar) with values in [0, T); index 0 is
    the paper's t = 1, as in the official implementation;
  * a model output has C channels, or 2C for learned variances (first C: the mean
    parameterization, last C: the variance parameterization);
  * every computation runs in the dtype of the `Schedule` (and the inputs' dtype, by JAX
    type promotion).

Mean parameterizations (`MEAN_TYPES`):
  * "eps": the noise epsilon (the paper's choice);
  * "x_start": x_0 itself;
  * "v": v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022);
  * "mean": the posterior mean mu-tilde(x_t, x_0), i.e. the mean of x_{t-1} (the paper's
    baseline; the official code calls it "xprev").

Variances (`VAR_TYPES`):
  * "fixedlarge": sigma_t^2 = beta_t (log-variance at t = 0 from the posterior variance
    at t = 1, as the official code);
  * "fixedsmall": sigma_t^2 = beta-tilde_t, the posterior variance (clipped at t = 0);
  * "learned": the network outputs log sigma_t^2 directly;
  * "learned_range": the network outputs v in [-1, 1] and
    log sigma_t^2 = frac log beta_t + (1 - frac) log beta-tilde_t, frac = (v + 1) / 2
    (Nichol & Dhariwal 2021).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion.schedules import Schedule

MEAN_TYPES = ("eps", "x_start", "v", "mean")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
LEARNED_VAR_TYPES = ("learned", "learned_range")


def check_mean_type(model_mean_type: str) -> None:
  """Raises ValueError naming the choices if `model_mean_type` is not in MEAN_TYPES."""
  if model_mean_type not in MEAN_TYPES:
    raise ValueError(f"Unknown model_mean_type {model_mean_type!r}; choose one of "
                     f"{MEAN_TYPES}.")


def check_var_type(model_var_type: str) -> None:
  """Raises ValueError naming the choices if `model_var_type` is not in VAR_TYPES."""
  if model_var_type not in VAR_TYPES:
    raise ValueError(f"Unknown model_var_type {model_var_type!r}; choose one of "
                     f"{VAR_TYPES}.")


def extract(coef: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """Gathers `coef[t]` and reshapes it to broadcast against an array of rank `ndim`.

  Args:
    coef: [T] schedule coefficients.
    t: [B] int timesteps (or a scalar).
    ndim: rank of the array the result multiplies, e.g. 4 for [B, H, W, C].

  Returns:
    [B, 1, ..., 1] (rank `ndim`), or a scalar for scalar t.
  """
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise TypeError(f"Timesteps must be integers in [0, T), got dtype {t.dtype}.")
  out = coef[t]
  if t.ndim == 0:
    return out
  return out.reshape(t.shape + (1,) * (ndim - t.ndim))


def _coef(schedule: Schedule, name: str, t: jax.Array, x: jax.Array) -> jax.Array:
  return extract(getattr(schedule, name), t, jnp.ndim(x))


# --- Forward process q(x_t | x_0) ----------------------------------------------------


def q_mean_variance(schedule: Schedule, x_start: jax.Array, t: jax.Array):
  """Moments of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance [B, 1, ...]).
  """
  mean = _coef(schedule, "sqrt_alphas_cumprod", t, x_start) * x_start
  variance = 1.0 - _coef(schedule, "alphas_cumprod", t, x_start)
  log_variance = _coef(schedule, "log_one_minus_alphas_cumprod", t, x_start)
  return mean, variance, log_variance


def q_sample(schedule: Schedule, x_start: jax.Array, t: jax.Array,
             noise: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) with the given standard-normal `noise` (same shape)."""
  if noise.shape != x_start.shape:
    raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}.")
  return (_coef(schedule, "sqrt_alphas_cumprod", t, x_start) * x_start +
          _coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x_start) * noise)


def q_posterior_mean_variance(schedule: Schedule, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array):
  """Moments of the posterior q(x_{t-1} | x_t, x_0) (Eqs. 6-7).

  Returns:
    (mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...]).
  """
  mean = (_coef(schedule, "posterior_mean_coef1", t, x_t) * x_start +
          _coef(schedule, "posterior_mean_coef2", t, x_t) * x_t)
  variance = _coef(schedule, "posterior_variance", t, x_t)
  log_variance = _coef(schedule, "posterior_log_variance_clipped", t, x_t)
  return mean, variance, log_variance


# --- Parameterization conversions ----------------------------------------------------
# Each takes the schedule, x_t [B, ...], t [B] and one prediction [B, ...], and returns
# another prediction [B, ...]; all are exact inverses of each other given x_t.


def predict_xstart_from_eps(schedule: Schedule, x_t, t, eps):
  """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)."""
  return (_coef(schedule, "sqrt_recip_alphas_cumprod", t, x_t) * x_t -
          _coef(schedule, "sqrt_recipm1_alphas_cumprod", t, x_t) * eps)


def predict_eps_from_xstart(schedule: Schedule, x_t, t, x_start):
  """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1 / alpha_bar - 1)."""
  return ((_coef(schedule, "sqrt_recip_alphas_cumprod", t, x_t) * x_t - x_start) /
          _coef(schedule, "sqrt_recipm1_alphas_cumprod", t, x_t))


def predict_xstart_from_v(schedule: Schedule, x_t, t, v):
  """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v."""
  return (_coef(schedule, "sqrt_alphas_cumprod", t, x_t) * x_t -
          _coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x_t) * v)


def predict_eps_from_v(schedule: Schedule, x_t, t, v):
  """eps = sqrt(1 - alpha_bar) x_t + sqrt(alpha_bar) v."""
  return (_coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x_t) * x_t +
          _coef(schedule, "sqrt_alphas_cumprod", t, x_t) * v)


def get_v(schedule: Schedule, x_start, noise, t):
  """The velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (the v target)."""
  return (_coef(schedule, "sqrt_alphas_cumprod", t, x_start) * noise -
          _coef(schedule, "sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)


def predict_xstart_from_mean(schedule: Schedule, x_t, t, mean):
  """Inverts the posterior mean: x_0 = (mu - coef2 x_t) / coef1."""
  return ((mean - _coef(schedule, "posterior_mean_coef2", t, x_t) * x_t) /
          _coef(schedule, "posterior_mean_coef1", t, x_t))


def training_target(schedule: Schedule, model_mean_type: str, x_start, x_t, t, noise):
  """What a model of the given mean type should output, for the L_simple loss."""
  check_mean_type(model_mean_type)
  if model_mean_type == "eps":
    return noise
  if model_mean_type == "x_start":
    return x_start
  if model_mean_type == "v":
    return get_v(schedule, x_start, noise, t)
  return q_posterior_mean_variance(schedule, x_start, x_t, t)[0]


def predict_xstart_and_eps(schedule: Schedule, mean_output, x_t, t, *,
                           model_mean_type: str, clip_denoised: bool = False):
  """Turns the mean part of a model output into predictions of x_0 and eps.

  With `clip_denoised`, x_0 is clipped to [-1, 1] and eps is re-derived from the clipped
  x_0, so that (x_t, x_0, eps) stay consistent (this is what makes DDIM with eta = 1
  coincide with ancestral sampling also when clipping).

  Returns:
    (pred_xstart, pred_eps), each shaped like x_t.
  """
  check_mean_type(model_mean_type)
  if model_mean_type == "eps":
    pred_xstart = predict_xstart_from_eps(schedule, x_t, t, mean_output)
    pred_eps = mean_output
  elif model_mean_type == "x_start":
    pred_xstart = mean_output
    pred_eps = None
  elif model_mean_type == "v":
    pred_xstart = predict_xstart_from_v(schedule, x_t, t, mean_output)
    pred_eps = predict_eps_from_v(schedule, x_t, t, mean_output)
  else:
    pred_xstart = predict_xstart_from_mean(schedule, x_t, t, mean_output)
    pred_eps = None
  if clip_denoised:
    pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    pred_eps = None
  if pred_eps is None:
    pred_eps = predict_eps_from_xstart(schedule, x_t, t, pred_xstart)
  return pred_xstart, pred_eps


# --- The reverse process p(x_{t-1} | x_t) -------------------------------------------


def split_model_output(model_output: jax.Array, x_t: jax.Array, model_var_type: str):
  """Splits a model output into its mean part and (for learned variances) variance part.

  Args:
    model_output: [B, H, W, C] for fixed variances, [B, H, W, 2C] for learned ones.
    x_t: [B, H, W, C], the model input.
    model_var_type: one of `VAR_TYPES`.

  Returns:
    (mean_output [B, H, W, C], var_output [B, H, W, C] or None).

  Raises:
    ValueError: when the output shape does not fit the variance type.
  """
  check_var_type(model_var_type)
  learned = model_var_type in LEARNED_VAR_TYPES
  expected = x_t.shape[:-1] + (x_t.shape[-1] * (2 if learned else 1),)
  if model_output.shape != expected:
    raise ValueError(
        f"Model output shape {model_output.shape} does not match model_var_type="
        f"{model_var_type!r}: expected {expected} for an input of shape {x_t.shape}. "
        "Learned variances need a model with 2x the input channels "
        "(out_channels = 2 * channels); fixed variances need exactly the input channels.")
  if not learned:
    return model_output, None
  channels = x_t.shape[-1]
  return model_output[..., :channels], model_output[..., channels:]


def model_variance(schedule: Schedule, var_output, x_t, t, model_var_type: str):
  """Variance and log-variance of p(x_{t-1} | x_t), broadcast to the shape of x_t."""
  check_var_type(model_var_type)
  if model_var_type == "fixedlarge":
    variance = _coef(schedule, "fixedlarge_variance", t, x_t)
    log_variance = _coef(schedule, "fixedlarge_log_variance", t, x_t)
  elif model_var_type == "fixedsmall":
    variance = _coef(schedule, "posterior_variance", t, x_t)
    log_variance = _coef(schedule, "posterior_log_variance_clipped", t, x_t)
  elif model_var_type == "learned":
    log_variance = var_output
    variance = jnp.exp(log_variance)
  else:  # learned_range
    min_log = _coef(schedule, "posterior_log_variance_clipped", t, x_t)
    max_log = _coef(schedule, "log_betas", t, x_t)
    frac = (var_output + 1.0) / 2.0
    log_variance = frac * max_log + (1.0 - frac) * min_log
    variance = jnp.exp(log_variance)
  shape = jnp.broadcast_shapes(jnp.shape(x_t), jnp.shape(log_variance))
  return jnp.broadcast_to(variance, shape), jnp.broadcast_to(log_variance, shape)


class PMeanVariance(NamedTuple):
  """The reverse-process Gaussian p(x_{t-1} | x_t) and the predictions behind it."""
  mean: jax.Array  # [B, H, W, C]
  variance: jax.Array  # [B, H, W, C]
  log_variance: jax.Array  # [B, H, W, C]
  pred_xstart: jax.Array  # [B, H, W, C]
  pred_eps: jax.Array  # [B, H, W, C]


def p_mean_variance(schedule: Schedule, model_output: jax.Array, x_t: jax.Array,
                    t: jax.Array, *, model_mean_type: str, model_var_type: str,
                    clip_denoised: bool = False) -> PMeanVariance:
  """The reverse-process distribution p(x_{t-1} | x_t) from a model output.

  As the official code: the mean is the posterior mean at the (optionally clipped)
  predicted x_0, except for model_mean_type "mean", where the model output is the mean
  itself (clipping then only affects `pred_xstart`).

  Args:
    schedule: the diffusion's coefficients.
    model_output: [B, H, W, C] or [B, H, W, 2C] (learned variances), the network output
      for (x_t, t).
    x_t: [B, H, W, C] the noisy input.
    t: [B] int timesteps.
    model_mean_type: one of `MEAN_TYPES`.
    model_var_type: one of `VAR_TYPES`.
    clip_denoised: clip the predicted x_0 to [-1, 1] (data range) before use.

  Returns:
    A `PMeanVariance` of arrays shaped like x_t.
  """
  check_mean_type(model_mean_type)
  mean_output, var_output = split_model_output(model_output, x_t, model_var_type)
  variance, log_variance = model_variance(schedule, var_output, x_t, t, model_var_type)
  pred_xstart, pred_eps = predict_xstart_and_eps(
      schedule, mean_output, x_t, t, model_mean_type=model_mean_type,
      clip_denoised=clip_denoised)
  if model_mean_type == "mean":
    mean = mean_output
  else:
    mean = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)[0]
  return PMeanVariance(mean, variance, log_variance, pred_xstart, pred_eps)
