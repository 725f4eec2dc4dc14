"""Noise schedules of the forward process and every coefficient derived from them.

The betas and all derived coefficients are computed in float64 NumPy, as the official
implementation does, and cast once to the requested device dtype. The result is a
`Schedule`: a NamedTuple of 1-D arrays indexed by the timestep `t` in [0, T), where
index 0 is the paper's t = 1. Being a NamedTuple it is a pytree, so it can be passed to
jitted functions, closed over, or replicated over a mesh like any other array tree.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")

# Cosine schedule constants of Nichol & Dhariwal (2021), Eq. 17 and the text after it.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


def _warmup_beta(beta_start: float, beta_end: float, num_timesteps: int,
                 warmup_frac: float) -> np.ndarray:
  """beta_end everywhere except a linear ramp from beta_start over the first steps."""
  betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  warmup_time = int(num_timesteps * warmup_frac)
  betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
  return betas


def _cosine_betas(num_timesteps: int) -> np.ndarray:
  """Nichol & Dhariwal: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas capped."""
  steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  alpha_bar = np.cos((steps + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2
  betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
  return np.minimum(betas, COSINE_MAX_BETA)


def get_beta_schedule(name: str, num_timesteps: int, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> np.ndarray:
  """Returns the betas of a named schedule as a float64 NumPy array of shape [T].

  Args:
    name: one of `BETA_SCHEDULES`:
      * "linear": the paper's, linearly spaced from beta_start to beta_end.
      * "quad": linearly spaced in sqrt(beta), then squared.
      * "const": beta_end at every step.
      * "jsd": 1/T, 1/(T-1), ..., 1 (Sohl-Dickstein et al.); the last step destroys the
        data completely (alpha_bar = 0), so x_0 cannot be recovered from x_{T-1}.
      * "warmup10" / "warmup50": beta_end, except a linear ramp from beta_start over the
        first 10% / 50% of the steps.
      * "cosine": Nichol & Dhariwal (2021), offset s = 0.008 and betas capped at 0.999
        (beta_start and beta_end are ignored).
    num_timesteps: the number of diffusion steps T (>= 1).
    beta_start: first beta of linear, quad and warmup schedules.
    beta_end: last beta of linear, quad and warmup schedules, and the constant of const.

  Raises:
    ValueError: for an unknown name, T < 1, or betas outside (0, 1].
  """
  if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  num_timesteps = int(num_timesteps)
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif name == "quad":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64)**2
  elif name == "const":
    betas = beta_end * np.ones(num_timesteps, dtype=np.float64)
  elif name == "jsd":
    betas = 1.0 / np.linspace(num_timesteps, 1, num_timesteps, dtype=np.float64)
  elif name == "warmup10":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.1)
  elif name == "warmup50":
    betas = _warmup_beta(beta_start, beta_end, num_timesteps, 0.5)
  elif name == "cosine":
    betas = _cosine_betas(num_timesteps)
  else:
    raise ValueError(f"Unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}.")
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError(
        f"Beta schedule {name!r} with beta_start={beta_start}, beta_end={beta_end} gives "
        "betas outside (0, 1]; pick 0 < beta_start, beta_end <= 1.")
  return betas


class Schedule(NamedTuple):
  """All per-timestep coefficients of the diffusion, each an array of shape [T].

  Index t in [0, T) is the paper's timestep t + 1. `alphas_cumprod_prev[0]` is 1 (no
  noise before the first step). Names follow the official implementation.
  """
  betas: jax.Array
  log_betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  log_alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  log_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  # log of the posterior variance, with the t = 0 entry (where it is 0) replaced by t = 1.
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array  # multiplies x_0
  posterior_mean_coef2: jax.Array  # multiplies x_t
  # "fixedlarge" reverse variance: beta_t; its log uses the posterior variance at t = 0.
  fixedlarge_variance: jax.Array
  fixedlarge_log_variance: jax.Array

  @property
  def num_timesteps(self) -> int:
    """T, the number of diffusion steps (static, from the array shape)."""
    return self.betas.shape[0]

  @property
  def dtype(self):
    """The dtype every computation with this schedule runs in."""
    return self.betas.dtype


def schedule_coefficients_f64(betas: np.ndarray) -> dict[str, np.ndarray]:
  """Computes every `Schedule` field from the betas in float64 NumPy.

  Args:
    betas: [T] betas in (0, 1].

  Returns:
    A dict from `Schedule` field name to a float64 array of shape [T].
  """
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or betas.shape[0] < 1:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
  if not (np.all(betas > 0) and np.all(betas <= 1)):
    raise ValueError("betas must lie in (0, 1].")
  alphas = 1.0 - betas
  alphas_cumprod = np.cumprod(alphas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  with np.errstate(divide="ignore"):
    # Infinite only where alpha_bar = 0 (the jsd schedule's last step).
    log_alphas_cumprod = np.cumsum(np.log(alphas))
    sqrt_recip = np.sqrt(1.0 / alphas_cumprod)
    sqrt_recipm1 = np.sqrt(1.0 / alphas_cumprod - 1.0)
  posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
  if betas.shape[0] > 1:
    clipped = np.append(posterior_variance[1], posterior_variance[1:])
    fixedlarge_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
  else:  # T = 1: the posterior variance is 0; fall back to beta (only the decoder exists).
    clipped = betas.copy()
    fixedlarge_log_variance = np.log(betas)
  return dict(
      betas=betas,
      log_betas=np.log(betas),
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      log_alphas_cumprod=log_alphas_cumprod,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=sqrt_recip,
      sqrt_recipm1_alphas_cumprod=sqrt_recipm1,
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(clipped),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(alphas) /
      (1.0 - alphas_cumprod),
      # As the official code: variance beta_t, but the log-variance (the only one that
      # enters sampling and the bound) takes the posterior variance at t = 0 "to get a
      # better decoder log likelihood".
      fixedlarge_variance=betas,
      fixedlarge_log_variance=fixedlarge_log_variance,
  )


def make_schedule(betas: np.ndarray, dtype=jnp.float32) -> Schedule:
  """Builds the `Schedule` of a beta array: float64 NumPy math, one cast to `dtype`.

  Args:
    betas: [T] float64 betas, e.g. from `get_beta_schedule`.
    dtype: device dtype of every coefficient (and so of every computation that uses the
      schedule): float32 (default) or float64. float64 requires x64 mode
      (`jax.config.update("jax_enable_x64", True)` or `with jax.enable_x64(True):`).

  Raises:
    ValueError: for invalid betas, a non-float dtype, or float64 without x64 mode (JAX
      would otherwise silently produce float32 arrays).
  """
  dtype = np.dtype(dtype)
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f"Schedule dtype must be a float dtype, got {dtype}.")
  if dtype == np.float64 and not jax.config.jax_enable_x64:
    raise ValueError(
        "make_schedule(dtype=float64) needs x64 mode, otherwise JAX would silently use "
        "float32. Enable it with jax.config.update('jax_enable_x64', True) (or the "
        "`with jax.enable_x64(True):` context), or ask for float32.")
  coefs = schedule_coefficients_f64(betas)
  return Schedule(**{name: jnp.asarray(value.astype(dtype)) for name, value in coefs.items()})
