"""Analytic-DPM (Bao et al. 2022): the optimal reverse variances of a trained model, and the
variational bound of respaced (K-step) chains under any per-step variances.

Notation (paper indexing n = 1..N; here timestep index t = n - 1 in [0, T)): alpha_bar_n,
beta_bar_n = 1 - alpha_bar_n. A chain is an increasing timestep subsequence
tau_1 < ... < tau_K (the full chain is 0, 1, ..., T - 1); its steps go from x_{tau_k} to
x_{tau_{k-1}} (to the data x_0 for k = 1) with
  alpha_k = alpha_bar_{tau_k} / alpha_bar_{tau_{k-1}},  beta_k = 1 - alpha_k
(alpha_bar_{tau_0} = 1), the chain's own posterior q(x_{tau_{k-1}} | x_{tau_k}, x_0) =
N(c1_k x_0 + c2_k x_{tau_k}, beta_tilde_k I) with
  beta_tilde_k = beta_bar_{k-1} beta_k / beta_bar_k,
  c1_k = sqrt(alpha_bar_{k-1}) beta_k / beta_bar_k,
  c2_k = sqrt(alpha_k) beta_bar_{k-1} / beta_bar_k,
and the model's step N(c1_k x0_hat + c2_k x_{tau_k}, sigma_k^2 I), x0_hat the network's
prediction of x_0 at tau_k (the DDPM step of the respaced chain).

Given Gamma_n = E_{q(x_n)} ||eps_theta(x_n, n)||^2 / d (estimated over training images,
`evaluation.analytic_job`), the variance that minimizes the bound of this Markov chain is
(Bao et al. 2022, Thm. 1 with lambda_n^2 = beta_tilde_n, in the chain's coefficients):
  sigma*_k^2 = beta_tilde_k + beta_k^2 / (alpha_k beta_bar_k) (1 - Gamma_{tau_k}),
clipped to the bounds of Thm. 2 for data in [-1, 1]:
  beta_tilde_k <= sigma*_k^2 <= beta_tilde_k + min(beta_k^2 / (alpha_k beta_bar_k), c1_k^2).
(The paper's data-range bound (sqrt(alpha_bar_{k-1}) - sqrt(beta_bar_{k-1} - lambda_k^2)
sqrt(alpha_bar_k / beta_bar_k))^2 ((b - a) / 2)^2 is c1_k^2 for lambda_k^2 = beta_tilde_k
and [a, b] = [-1, 1]: the posterior mean's weight on x_0 times the largest variance of x_0.)
At k = 1 the lower bound is 0; variances are floored at `VARIANCE_FLOOR` so that a Monte
Carlo estimate Gamma >= 1 cannot give a zero decoder variance.

The fixed variances of a chain follow the official code's conventions on the full chain:
"fixedsmall" beta_tilde_k and "fixedlarge" beta_k, both with the k = 1 entry replaced by
beta_tilde_2 (the full chain 0..T-1 gives exactly the `Schedule`'s values).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion.schedules import Schedule

VARIANCES = ("fixedsmall", "fixedlarge", "analytic")
VARIANCE_FLOOR = 1e-12
_LOG2 = math.log(2.0)


def even_chain(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The K-step chain round(linspace(0, T - 1, K)): it keeps both ends, so its bound has
  the full chain's prior term L_T and a decoder at t = 1 (int64 [K])."""
  if not 1 <= int(num_steps) <= int(num_timesteps):
    raise ValueError(f"A chain needs 1 <= K <= T steps; got K={num_steps}, "
                     f"T={num_timesteps}.")
  if num_steps == 1:
    return np.array([num_timesteps - 1], np.int64)
  return np.round(np.linspace(0, num_timesteps - 1, int(num_steps))).astype(np.int64)


def check_chain(timesteps: Sequence[int], num_timesteps: int) -> np.ndarray:
  """Returns `timesteps` as int64 [K] or raises naming the problem."""
  tau = np.asarray(timesteps)
  if tau.ndim != 1 or tau.size < 1 or not np.issubdtype(tau.dtype, np.integer):
    raise ValueError(f"A chain is a non-empty 1-D integer array of timesteps; got {tau!r}.")
  if tau[0] < 0 or tau[-1] >= num_timesteps or np.any(np.diff(tau) <= 0):
    raise ValueError(f"Chain timesteps must increase strictly within [0, {num_timesteps}); "
                     f"got {tau.tolist()}.")
  return tau.astype(np.int64)


class Chain(NamedTuple):
  """Float64 coefficients of a chain's K steps (host arrays, each [K]; index k - 1)."""
  timesteps: np.ndarray  # int64 tau_k
  alphas_cumprod: np.ndarray  # alpha_bar_{tau_k}
  alphas: np.ndarray  # alpha_k
  betas: np.ndarray  # beta_k
  posterior_variance: np.ndarray  # beta_tilde_k (0 at k = 1)
  coef1: np.ndarray  # c1_k, multiplies x_0
  coef2: np.ndarray  # c2_k, multiplies x_{tau_k}


def chain_coefficients(alphas_cumprod: np.ndarray, timesteps: Sequence[int]) -> Chain:
  """The chain's coefficients from the schedule's float64 alpha_bar [T]."""
  abar_all = np.asarray(alphas_cumprod, np.float64)
  tau = check_chain(timesteps, abar_all.shape[0])
  abar = abar_all[tau]
  abar_prev = np.concatenate([[1.0], abar[:-1]])
  alphas = abar / abar_prev
  betas = 1.0 - alphas
  bbar, bbar_prev = 1.0 - abar, 1.0 - abar_prev
  return Chain(timesteps=tau, alphas_cumprod=abar, alphas=alphas, betas=betas,
               posterior_variance=bbar_prev * betas / bbar,
               coef1=np.sqrt(abar_prev) * betas / bbar,
               coef2=np.sqrt(alphas) * bbar_prev / bbar)


def variance_bounds(chain: Chain) -> tuple[np.ndarray, np.ndarray]:
  """(lower [K], upper [K]) of the optimal variance for data in [-1, 1] (Thm. 2)."""
  lower = chain.posterior_variance
  score_bound = chain.betas**2 / (chain.alphas * (1.0 - chain.alphas_cumprod))
  return lower, lower + np.minimum(score_bound, chain.coef1**2)


def optimal_variance(chain: Chain, gamma: np.ndarray, clip: bool = True
                     ) -> Dict[str, np.ndarray]:
  """The Analytic-DPM variances of a chain from Gamma over all T timesteps.

  Args:
    chain: `chain_coefficients(...)`.
    gamma: [T] estimates of E ||eps_theta(x_t, t)||^2 / d.
    clip: clip into the bounds of Thm. 2 (the paper's practice).

  Returns:
    {"variance": [K] float64 (clipped if `clip`, floored at VARIANCE_FLOOR),
     "unclipped": [K], "lower": [K], "upper": [K]}.
  """
  gamma = np.asarray(gamma, np.float64)
  if gamma.ndim != 1 or gamma.shape[0] <= int(chain.timesteps[-1]):
    raise ValueError(f"gamma must be [T] (one value per timestep); got {gamma.shape} for "
                     f"a chain up to timestep {int(chain.timesteps[-1])}.")
  if not np.all(np.isfinite(gamma)):
    raise ValueError("gamma has non-finite entries; re-run the analytic job.")
  g = gamma[chain.timesteps]
  unclipped = chain.posterior_variance + chain.betas**2 / (
      chain.alphas * (1.0 - chain.alphas_cumprod)) * (1.0 - g)
  lower, upper = variance_bounds(chain)
  variance = np.clip(unclipped, lower, upper) if clip else unclipped
  return {"variance": np.maximum(variance, VARIANCE_FLOOR), "unclipped": unclipped,
          "lower": lower, "upper": upper}


def fixed_log_variance(chain: Chain, kind: str) -> np.ndarray:
  """log of the chain's "fixedsmall" or "fixedlarge" variance [K] (k = 1 as the official
  code: beta_tilde_2; a 1-step chain keeps beta_1)."""
  if kind not in ("fixedsmall", "fixedlarge"):
    raise ValueError(f"Unknown fixed variance {kind!r}; use 'fixedsmall' or 'fixedlarge'.")
  values = chain.posterior_variance if kind == "fixedsmall" else chain.betas
  values = values.copy()
  values[0] = chain.posterior_variance[1] if values.shape[0] > 1 else chain.betas[0]
  return np.log(values)


def chain_log_variances(chain: Chain, variances: Sequence[str],
                        gamma: np.ndarray | None = None) -> np.ndarray:
  """[V, K] float64 log-variances of the named options (`VARIANCES`)."""
  rows = []
  for kind in variances:
    if kind == "analytic":
      if gamma is None:
        raise ValueError("The analytic variance needs Gamma (run the analytic job).")
      rows.append(np.log(optimal_variance(chain, gamma)["variance"]))
    else:
      rows.append(fixed_log_variance(chain, kind))
  return np.stack(rows)


def _check_t_chunk(t_chunk: int, count: int, what: str) -> None:
  if not isinstance(t_chunk, int) or t_chunk < 1 or count % t_chunk:
    raise ValueError(f"t_chunk={t_chunk!r} must be a positive integer dividing {what}="
                     f"{count}.")


def _model_eps_and_xstart(model_fn, schedule, x_t, t, model_mean_type, model_var_type,
                          clip_denoised):
  mean_output, _ = process.split_model_output(model_fn(x_t, t), x_t, model_var_type)
  return process.predict_xstart_and_eps(schedule, mean_output, x_t, t,
                                        model_mean_type=model_mean_type,
                                        clip_denoised=clip_denoised)


def eps_norm_terms(model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   schedule: Schedule, x_start: jax.Array, keys: jax.Array, *,
                   model_mean_type: str, model_var_type: str, t_chunk: int = 1
                   ) -> jax.Array:
  """||eps_theta(x_t, t)||^2 / d of every image at every timestep: the Monte Carlo terms
  of Gamma_t (one `lax.scan` over T).

  x_t of image b uses the noise `fold_in(keys[b], t)`, as `bound.calc_bpd`. eps_theta is
  the network's noise prediction in any parameterization (unclipped).

  Args:
    model_fn: `model_fn(x_t [N, H, W, C], t [N]) -> [N, H, W, C or 2C]`, N = B * t_chunk.
    schedule: the diffusion's coefficients.
    x_start: [B, H, W, C] data in [-1, 1].
    keys: [B] per-image PRNG keys.
    model_mean_type: one of `process.MEAN_TYPES`.
    model_var_type: one of `process.VAR_TYPES`.
    t_chunk: timesteps per model call; must divide T.

  Returns:
    [B, T] in the schedule's dtype.
  """
  num_timesteps = schedule.num_timesteps
  _check_t_chunk(t_chunk, num_timesteps, "T")
  batch, image_shape, dtype = x_start.shape[0], x_start.shape[1:], schedule.dtype
  keys = randomness.as_key_array(keys, batch)
  x_start = x_start.astype(dtype)

  def chunk(carry, start):
    ts = start + jnp.arange(t_chunk, dtype=jnp.int32)  # [C]
    noise = jax.vmap(lambda t: randomness.per_example_normal(keys, t, image_shape, dtype)
                     )(ts)  # [C, B, H, W, ch]
    t_b = jnp.repeat(ts, batch)  # [C * B]
    x0 = jnp.broadcast_to(x_start, noise.shape).reshape((-1,) + image_shape)
    x_t = process.q_sample(schedule, x0, t_b, noise.reshape(x0.shape))
    _, eps = _model_eps_and_xstart(model_fn, schedule, x_t, t_b, model_mean_type,
                                   model_var_type, False)
    return carry, losses.mean_flat(jnp.square(eps)).reshape(t_chunk, batch)

  starts = jnp.arange(0, num_timesteps, t_chunk, dtype=jnp.int32)
  _, out = jax.lax.scan(chunk, None, starts)  # [T / C, C, B]
  return out.reshape(num_timesteps, batch).T


def chain_bound(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
                x_start: jax.Array, keys: jax.Array, chain: Chain,
                log_variances: np.ndarray, *, model_mean_type: str, model_var_type: str,
                clip_denoised: bool = False, t_chunk: int = 1) -> Dict[str, jax.Array]:
  """The variational bound of a chain in bits/dim, for V variance choices at once.

  -log p(x_0) <= L_prior + sum_{k >= 2} KL(q(x_{tau_{k-1}} | x_{tau_k}, x_0) ||
  p(x_{tau_{k-1}} | x_{tau_k})) + L_decoder, with L_prior = KL(q(x_{tau_K} | x_0) ||
  N(0, I)) and the decoder the discretized Gaussian N(x0_hat(x_{tau_1}), sigma_1^2) over
  256 bins (`losses.discretized_gaussian_log_likelihood`). One network call per step
  serves every variance choice (the mean does not depend on it), so the bounds of the V
  choices are paired: same x_t, same predictions. x_{tau_k} of image b uses the noise
  `fold_in(keys[b], tau_k)` (as `bound.calc_bpd`); the steps run in one `lax.scan`.

  Args:
    model_fn: `model_fn(x_t [N, H, W, C], t [N]) -> [N, H, W, C or 2C]`, N = B * t_chunk.
    schedule: the diffusion's coefficients.
    x_start: [B, H, W, C] data in [-1, 1] on the 256-level grid.
    keys: [B] per-image PRNG keys.
    chain: `chain_coefficients(...)` of the timesteps.
    log_variances: [V, K] log sigma_k^2 of each choice (`chain_log_variances`).
    model_mean_type: one of `process.MEAN_TYPES` (x0_hat from the mean output).
    model_var_type: one of `process.VAR_TYPES` (only to split the output; the variances
      are `log_variances`).
    clip_denoised: clip x0_hat to [-1, 1].
    t_chunk: steps per model call; must divide K.

  Returns:
    {"total_bpd": [B, V], "terms_bpd": [B, V, K] (column 0: the decoder), "prior_bpd":
    [B], "mse": [B, K] (mean squared error of x0_hat)}.
  """
  process.check_mean_type(model_mean_type)
  num_steps = int(chain.timesteps.shape[0])
  _check_t_chunk(t_chunk, num_steps, "K")
  log_variances = np.asarray(log_variances, np.float64)
  if log_variances.ndim != 2 or log_variances.shape[1] != num_steps:
    raise ValueError(f"log_variances must be [V, K={num_steps}]; got "
                     f"{log_variances.shape}.")
  batch, image_shape, dtype = x_start.shape[0], x_start.shape[1:], schedule.dtype
  keys = randomness.as_key_array(keys, batch)
  x_start = x_start.astype(dtype)
  # Per-step constants, [K / C, C] (and [K / C, C, V]); the k = 1 posterior variance
  # (0) is replaced by 1 where it only enters the unused KL branch.
  shape = (num_steps // t_chunk, t_chunk)
  post_var = chain.posterior_variance.copy()
  post_var[0] = 1.0
  steps = {
      "t": jnp.asarray(chain.timesteps, jnp.int32).reshape(shape),
      "first": jnp.asarray(np.arange(num_steps) == 0).reshape(shape),
      "c1": jnp.asarray(chain.coef1, dtype).reshape(shape),
      "c2": jnp.asarray(chain.coef2, dtype).reshape(shape),
      "log_post": jnp.asarray(np.log(post_var), dtype).reshape(shape),
      "post": jnp.asarray(post_var, dtype).reshape(shape),
      "logv": jnp.asarray(log_variances.T, dtype).reshape(shape + (-1,)),
  }

  def one_step_terms(x_t, x0_hat, s):  # one step's [B, ...] -> ([B, V], [B])
    mean = s["c1"] * x0_hat + s["c2"] * x_t
    err = losses.mean_flat(jnp.square(s["c1"] * (x_start - x0_hat)))  # [B]
    logv = s["logv"][None, :]  # [1, V]
    kl = 0.5 * (-1.0 + logv - s["log_post"] + (s["post"] + err[:, None]) * jnp.exp(-logv))

    def decoder(lv):
      return -losses.mean_flat(losses.discretized_gaussian_log_likelihood(
          x_start, means=mean, log_scales=0.5 * lv))

    nll = jax.vmap(decoder, out_axes=1)(s["logv"])  # [B, V]
    terms = jnp.where(s["first"], nll, kl) / _LOG2
    return terms, losses.mean_flat(jnp.square(x0_hat - x_start))

  def chunk(carry, s):
    noise = jax.vmap(lambda t: randomness.per_example_normal(keys, t, image_shape, dtype)
                     )(s["t"])  # [C, B, H, W, ch]
    t_b = jnp.repeat(s["t"], batch)
    x0 = jnp.broadcast_to(x_start, noise.shape).reshape((-1,) + image_shape)
    x_t = process.q_sample(schedule, x0, t_b, noise.reshape(x0.shape))
    x0_hat, _ = _model_eps_and_xstart(model_fn, schedule, x_t, t_b, model_mean_type,
                                      model_var_type, clip_denoised)
    x_t = x_t.reshape((t_chunk, batch) + image_shape)
    x0_hat = x0_hat.reshape(x_t.shape)
    terms, mse = jax.vmap(one_step_terms)(x_t, x0_hat, s)  # [C, B, V], [C, B]
    return carry, (terms, mse)

  _, (terms, mse) = jax.lax.scan(chunk, None, steps)  # [K / C, C, B, V], [K / C, C, B]
  terms = terms.reshape(num_steps, batch, -1).transpose(1, 2, 0)  # [B, V, K]
  last = jnp.full((batch,), int(chain.timesteps[-1]), jnp.int32)
  mean, _, log_var = process.q_mean_variance(schedule, x_start, last)
  prior = losses.mean_flat(losses.normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2
  return {"total_bpd": jnp.sum(terms, axis=2) + prior[:, None], "terms_bpd": terms,
          "prior_bpd": prior, "mse": mse.reshape(num_steps, batch).T}
