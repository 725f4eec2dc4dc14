"""Training objectives and the terms of the variational bound, in nats or bits per dim.

Loss types (`LOSS_TYPES`), per example:
  * "mse": L_simple, the unweighted mean squared error between the model's mean output
    and its target (eps -> the noise, x_start -> x_0, v -> v, mean -> the posterior
    mean mu-tilde). Learned variances get no gradient from it, so it rejects them.
  * "kl": the true variational bound term L_{t-1} of the sampled t, in bits/dim: the
    Gaussian KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretized
    Gaussian decoder NLL -log p(x_0 | x_1) at t = 0 (Eq. 13).
  * "hybrid": L_simple + hybrid_lambda * L_vlb (Nichol & Dhariwal 2021), where the
    single-sample estimate of L_vlb = sum_t L_t is T * (the "kl" term), and the bound
    term sees the mean with its gradient stopped, so it trains only the variance.
  * "rescaled_mse": Nichol & Dhariwal's name for the same objective with its fixed
    weight: L_simple, plus (T / 1000) * (the "kl" term, mean gradient stopped) when the
    variance is learned (equal to "hybrid" with hybrid_lambda = 1e-3 then).

Every cell of the paper's Table 2 is a (model_mean_type, model_var_type, loss_type)
triple: see `TABLE2`.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.schedules import Schedule

LOSS_TYPES = ("mse", "kl", "rescaled_mse", "hybrid")

# The paper's Table 2 (CIFAR10 ablation): row -> the configuration that trains it.
# "Fixed isotropic Sigma" is sigma_t^2 = beta_t, the official default ("fixedlarge").
TABLE2 = {
    "mu_tilde prediction, L, learned diagonal Sigma":
        dict(model_mean_type="mean", model_var_type="learned", loss_type="kl"),
    "mu_tilde prediction, L, fixed isotropic Sigma":
        dict(model_mean_type="mean", model_var_type="fixedlarge", loss_type="kl"),
    "mu_tilde prediction, ||mu_tilde - mu_theta||^2":
        dict(model_mean_type="mean", model_var_type="fixedlarge", loss_type="mse"),
    "eps prediction, L, learned diagonal Sigma":
        dict(model_mean_type="eps", model_var_type="learned", loss_type="kl"),
    "eps prediction, L, fixed isotropic Sigma":
        dict(model_mean_type="eps", model_var_type="fixedlarge", loss_type="kl"),
    "eps prediction, ||eps - eps_theta||^2 (L_simple)":
        dict(model_mean_type="eps", model_var_type="fixedlarge", loss_type="mse"),
}

_LOG2 = math.log(2.0)


def check_loss_config(model_mean_type: str, model_var_type: str, loss_type: str) -> None:
  """Raises ValueError for unknown names or a combination that cannot train.

  Call it before compiling a train step: every error names the fix.
  """
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}.")
  if loss_type == "mse" and model_var_type in process.LEARNED_VAR_TYPES:
    raise ValueError(
        f"loss_type='mse' gives no gradient to a learned variance ({model_var_type!r}); "
        "use loss_type 'hybrid', 'rescaled_mse' or 'kl', or a fixed variance "
        "('fixedlarge' / 'fixedsmall').")


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over all axes but the first: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by the official code."""
  return 0.5 * (1.0 + jnp.tanh(_CDF_SCALE * (x + _CDF_CUBIC * x**3)))


_CDF_SCALE = math.sqrt(2.0 / math.pi)
_CDF_CUBIC = 0.044715
_LOG_FLOOR = math.log(1e-12)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log P(x) of data discretized to 256 levels in [-1, 1] under N(means, exp(log_scales)^2).

  Bin k (x = -1 + 2k/255) covers [x - 1/255, x + 1/255], except that the first bin
  extends to -inf and the last to +inf, so the 256 probabilities sum to one. As the
  official code: the CDF is the tanh approximation Phi(z) ~ (1 + tanh(g(z))) / 2 with
  g(z) = sqrt(2/pi) (z + 0.044715 z^3), edge bins are detected with the thresholds
  -0.999 / 0.999, and probabilities are floored at 1e-12 before the log.

  The same function is evaluated without cancellation: the official code subtracts two
  CDF values, which loses all precision in the tails (for example, in float32 a bin of
  probability 1e-6 where the CDF is near 1). Here, with a = g(z+), b = g(z-), d = a - b:
    P(bin) = (tanh a - tanh b) / 2 = sinh(d) / (2 cosh a cosh b),
    log P = 2 min(a, 0) - 2 max(b, 0) + log(1 - e^{-2d}) - softplus(-2|a|)
            - softplus(-2|b|),
  d is formed in factored form, and the edge bins use log Phi(z) = -softplus(-2 g(z)).

  Args:
    x: [B, ...] data in [-1, 1] on the 256-level grid.
    means: the Gaussian means, broadcastable to x.
    log_scales: log standard deviations, broadcastable to x.

  Returns:
    [B, ...] log-probabilities in nats.
  """
  inv_stdv = jnp.exp(-log_scales)
  plus_in = inv_stdv * (x - means + 1.0 / 255.0)
  min_in = inv_stdv * (x - means - 1.0 / 255.0)
  a = _CDF_SCALE * (plus_in + _CDF_CUBIC * plus_in**3)
  b = _CDF_SCALE * (min_in + _CDF_CUBIC * min_in**3)
  # a - b = scale (p - m) (1 + cubic (p^2 + p m + m^2)), without cancellation.
  sum_sq = 0.5 * (jnp.square(plus_in + min_in) + jnp.square(plus_in) + jnp.square(min_in))
  d = _CDF_SCALE * (inv_stdv * (2.0 / 255.0)) * (1.0 + _CDF_CUBIC * sum_sq)
  log_delta = (2.0 * jnp.minimum(a, 0.0) - 2.0 * jnp.maximum(b, 0.0) +
               jnp.log(-jnp.expm1(-2.0 * d)) - jax.nn.softplus(-2.0 * jnp.abs(a)) -
               jax.nn.softplus(-2.0 * jnp.abs(b)))
  log_cdf_plus = -jax.nn.softplus(-2.0 * a)  # log Phi(z+), the first bin.
  log_one_minus_cdf_min = -jax.nn.softplus(2.0 * b)  # log (1 - Phi(z-)), the last bin.
  log_probs = jnp.where(x < -0.999, log_cdf_plus,
                        jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))
  return jnp.maximum(log_probs, _LOG_FLOOR)


def prior_bpd(schedule: Schedule, x_start: jax.Array) -> jax.Array:
  """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per example: [B, ...] -> [B]."""
  t = jnp.full((x_start.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
  mean, _, log_variance = process.q_mean_variance(schedule, x_start, t)
  return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / _LOG2


def vb_terms_bpd(schedule: Schedule, model_output: jax.Array, x_start: jax.Array,
                 x_t: jax.Array, t: jax.Array, *, model_mean_type: str,
                 model_var_type: str, clip_denoised: bool = False):
  """The bound term L_{t-1} of each example in bits/dim, and the predicted x_0.

  Args:
    schedule: the diffusion's coefficients.
    model_output: the network output for (x_t, t), [B, H, W, C] or [B, H, W, 2C].
    x_start: [B, H, W, C] data in [-1, 1].
    x_t: [B, H, W, C] a sample of q(x_t | x_0).
    t: [B] int timesteps.
    model_mean_type: one of `process.MEAN_TYPES`.
    model_var_type: one of `process.VAR_TYPES`.
    clip_denoised: clip the predicted x_0 to [-1, 1].

  Returns:
    (terms [B]: the decoder NLL where t == 0, the KL elsewhere; pred_xstart [B, H, W, C]).
  """
  true_mean, _, true_log_variance = process.q_posterior_mean_variance(
      schedule, x_start, x_t, t)
  out = process.p_mean_variance(
      schedule, model_output, x_t, t, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised)
  kl = mean_flat(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance))
  decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
      x_start, means=out.mean, log_scales=0.5 * out.log_variance))
  terms = jnp.where(t == 0, decoder_nll, kl) / _LOG2
  return terms, out.pred_xstart


def training_losses(model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                    schedule: Schedule, x_start: jax.Array, t: jax.Array,
                    noise: jax.Array, *, model_mean_type: str, model_var_type: str,
                    loss_type: str, hybrid_lambda: float = 0.001) -> dict:
  """Per-example training losses at the given timesteps and noise.

  Args:
    model_fn: `model_fn(x_t [B, H, W, C], t [B]) -> [B, H, W, C or 2C]`.
    schedule: the diffusion's coefficients.
    x_start: [B, H, W, C] data in [-1, 1].
    t: [B] int32 timesteps, usually uniform in [0, T).
    noise: [B, H, W, C] standard normal noise.
    model_mean_type: one of `process.MEAN_TYPES`.
    model_var_type: one of `process.VAR_TYPES`.
    loss_type: one of `LOSS_TYPES` (see the module docstring).
    hybrid_lambda: the weight lambda of L_vlb in the "hybrid" loss.

  Returns:
    A dict of [B] arrays: "loss" (what to minimize, averaged over the batch by the
    caller), "mse" (L_simple of the mean output) and "vb" (the bound term L_{t-1} in
    bits/dim; for hybrid and rescaled_mse computed with the mean's gradient stopped).
  """
  check_loss_config(model_mean_type, model_var_type, loss_type)
  x_t = process.q_sample(schedule, x_start, t, noise)
  model_output = model_fn(x_t, t)
  mean_output, var_output = process.split_model_output(model_output, x_t, model_var_type)
  target = process.training_target(schedule, model_mean_type, x_start, x_t, t, noise)
  mse = mean_flat(jnp.square(target - mean_output))

  learned = model_var_type in process.LEARNED_VAR_TYPES
  if loss_type in ("hybrid", "rescaled_mse"):
    frozen = jax.lax.stop_gradient(mean_output)
    vb_output = frozen if var_output is None else jnp.concatenate([frozen, var_output], -1)
  else:
    vb_output = model_output
  vb, _ = vb_terms_bpd(schedule, vb_output, x_start, x_t, t,
                       model_mean_type=model_mean_type, model_var_type=model_var_type)

  num_timesteps = schedule.num_timesteps
  if loss_type == "mse":
    loss = mse
  elif loss_type == "kl":
    loss = vb
  elif loss_type == "hybrid":
    loss = mse + (float(hybrid_lambda) * num_timesteps) * vb
  else:  # rescaled_mse
    loss = mse + (num_timesteps / 1000.0) * vb if learned else mse
  return {"loss": loss, "mse": mse, "vb": vb}
