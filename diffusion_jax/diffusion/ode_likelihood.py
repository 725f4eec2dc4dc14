"""Likelihood of a discrete-time DDPM through its probability-flow ODE (Song et al. 2021).

Continuous-time view. Time t in [0, 1]; the network's timestep input is t (T - 1), so
the discrete model's timesteps sit at t_i = i / (T - 1); beta(t) is the piecewise-linear
interpolation of T beta_i at the t_i, and alpha_bar(t) = exp(-int_0^t beta(s) ds),
sigma(t) = sqrt(1 - alpha_bar(t)). For the paper's linear schedule this is exactly the VP
SDE of score_sde (beta_min = T beta_1 = 0.1, beta_max = T beta_T = 20), with which that
code evaluates DDPM likelihoods; other schedules are its piecewise-linear generalization
(the continuous alpha_bar(t_i) then differs from the discrete alpha_bar_i by about one
step's beta, as in score_sde). The network's noise prediction gives the score
-eps_theta(x, t (T - 1)) / sigma(t) (x_start and v outputs are converted with
alpha_bar(t); the "mean" parameterization has no continuous-time meaning and is refused).

Probability-flow ODE: dx/dt = f(x, t) = -beta(t) / 2 (x - eps_theta / sigma(t)), and by the
instantaneous change of variables
  log p_{t_min}(x) = log N(x(1); 0, I) + int_{t_min}^1 div f(x(t), t) dt,
integrated from the data at t_min (score_sde's 1e-5) to t = 1 with an adaptive solver of
`diffrax` (Dopri5 or Tsit5, PID step control on each image's own state, so an image's
result does not depend on the batch it is in). The divergence is exact (d vector-Jacobian
products, for small images) or Hutchinson's unbiased estimate E[e^T (df/dx) e] with
Rademacher or Gaussian probes e, the same probes over the whole trajectory (FFJORD), P per
image; the P estimates share the trajectory and their mean is reported.

Dequantization (as score_sde): uint8 x -> z = 2 (x + u) / 256 - 1, u ~ U[0, 1)^d, so
  bits/dim = -log p(z) / (d ln 2) + 7,
7 = log2(256 / 2) being the change of variables from z in [-1, 1) to the unit bins of
[0, 256)^d (`DEQUANTIZATION_OFFSET_BPD`); by Jensen's inequality this bounds the
discrete data's bits/dim from above (in expectation over u).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import process

TRACES = ("rademacher", "gaussian", "exact")
SOLVERS = ("dopri5", "tsit5")
T_MIN = 1e-5  # score_sde's integration start
DEQUANTIZATION_OFFSET_BPD = 7.0  # log2(256 / 2)


class VPTime(NamedTuple):
  """The continuous-time view of a discrete schedule (host float64 knots, each [T])."""
  beta: np.ndarray  # T beta_i, the value of beta(t) at t_i
  integral: np.ndarray  # int_0^{t_i} beta(s) ds (trapezoids)

  @property
  def num_timesteps(self) -> int:
    return self.beta.shape[0]


def vp_time(betas: np.ndarray) -> VPTime:
  """The continuous-time view of the discrete betas [T] (T >= 2)."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.shape[0] < 2:
    raise ValueError(f"The ODE view needs T >= 2 betas, got shape {betas.shape}.")
  num = betas.shape[0]
  beta = num * betas
  h = 1.0 / (num - 1)
  integral = np.concatenate([[0.0], np.cumsum(0.5 * h * (beta[1:] + beta[:-1]))])
  return VPTime(beta=beta, integral=integral)


def _segment(vp: VPTime, t: jax.Array):
  """(beta at the segment start, slope, offset into the segment, integral at its start)."""
  num = vp.num_timesteps
  h = 1.0 / (num - 1)
  i = jnp.clip(jnp.floor(t * (num - 1)).astype(jnp.int32), 0, num - 2)
  beta = jnp.asarray(vp.beta, t.dtype)
  integral = jnp.asarray(vp.integral, t.dtype)
  offset = t - i.astype(t.dtype) * h
  return beta[i], (beta[i + 1] - beta[i]) / h, offset, integral[i]


def beta_at(vp: VPTime, t: jax.Array) -> jax.Array:
  """beta(t) (any shape of t)."""
  b0, slope, offset, _ = _segment(vp, t)
  return b0 + slope * offset


def log_alpha_bar_at(vp: VPTime, t: jax.Array) -> jax.Array:
  """log alpha_bar(t) = -int_0^t beta(s) ds (exact for the piecewise-linear beta)."""
  b0, slope, offset, start = _segment(vp, t)
  return -(start + b0 * offset + 0.5 * slope * offset**2)


def eps_from_output(model_output: jax.Array, x: jax.Array, log_alpha_bar: jax.Array, *,
                    model_mean_type: str, model_var_type: str) -> jax.Array:
  """The noise prediction of a model output at the continuous level alpha_bar."""
  process.check_mean_type(model_mean_type)
  if model_mean_type == "mean":
    raise ValueError("The ODE likelihood needs a noise, x_0 or v prediction; "
                     "model_mean_type='mean' (the posterior mean of a discrete step) has "
                     "no continuous-time counterpart.")
  out, _ = process.split_model_output(model_output, x, model_var_type)
  a = jnp.exp(0.5 * log_alpha_bar)
  s = jnp.sqrt(-jnp.expm1(log_alpha_bar))
  if model_mean_type == "eps":
    return out
  if model_mean_type == "x_start":
    return (x - a * out) / s
  return s * x + a * out  # v


def dequantize(images_uint8: jax.Array, u: jax.Array) -> jax.Array:
  """z = 2 (x + u) / 256 - 1 for integer levels x in [0, 255] and u in [0, 1)."""
  return (images_uint8.astype(u.dtype) + u) / 128.0 - 1.0


def probes(key: jax.Array, kind: str, num: int, shape, dtype) -> jax.Array:
  """[num, *shape] Hutchinson probes of one image: Rademacher (+-1) or standard normal."""
  if kind == "rademacher":
    return jax.random.rademacher(key, (num,) + tuple(shape), dtype)
  if kind == "gaussian":
    return jax.random.normal(key, (num,) + tuple(shape), dtype)
  raise ValueError(f"Unknown probe kind {kind!r}; use 'rademacher' or 'gaussian'.")


def check_settings(trace: str, num_probes: int, solver: str, rtol: float, atol: float,
                   t_min: float) -> None:
  """Raises ValueError naming the setting and its choices."""
  if trace not in TRACES:
    raise ValueError(f"Unknown divergence estimate {trace!r}; choose one of {TRACES}.")
  if trace != "exact" and (not isinstance(num_probes, int) or num_probes < 1):
    raise ValueError(f"num_probes={num_probes!r} must be a positive integer.")
  if solver not in SOLVERS:
    raise ValueError(f"Unknown ODE solver {solver!r}; choose one of {SOLVERS}.")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"ODE tolerances must be positive; got rtol={rtol}, atol={atol}.")
  if not 0 < t_min < 1:
    raise ValueError(f"t_min={t_min} must lie in (0, 1) (score_sde uses 1e-5).")


def log_likelihood(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], vp: VPTime,
                   z: jax.Array, probe_vectors: jax.Array | None, *, trace: str,
                   solver: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                   t_min: float = T_MIN, max_steps: int = 4096,
                   exact_chunk: int = 64) -> Dict[str, jax.Array]:
  """log p(z) of every image by the probability-flow ODE (one adaptive solve per image).

  Args:
    eps_fn: `eps_fn(x [N, H, W, C], label [N] float) -> eps [N, H, W, C]`, the noise
      prediction at the continuous timestep label t (T - 1) (see `eps_from_output`).
    vp: `vp_time(betas)`.
    z: [B, H, W, C] points in data space (e.g. `dequantize(...)`); their dtype is the
      compute dtype.
    probe_vectors: [B, P, H, W, C] Hutchinson probes (None for trace="exact").
    trace: "exact" or the probes' kind ("rademacher", "gaussian"; only recorded).
    solver: "dopri5" (score_sde's RK45) or "tsit5".
    rtol, atol: the PID controller's tolerances (score_sde: 1e-5 both).
    t_min: where the integration starts.
    max_steps: solver steps per image before giving up (reported as not successful).
    exact_chunk: basis vectors per batched VJP of the exact trace.

  Returns:
    {"logp": [B] log p(z) in nats (the mean over probes), "prior_logp": [B]
    log N(x(1); 0, I), "delta_logp": [B, P] the divergence integral per probe (P = 1 for
    the exact trace), "x1": [B, H, W, C] the end point, "num_steps": [B] solver steps
    (accepted and rejected), "success": [B] bool}.
  """
  check_settings(trace, 1, solver, rtol, atol, t_min)
  dtype = z.dtype
  image_shape = z.shape[1:]
  dim = math.prod(image_shape)
  if trace == "exact":
    basis = jnp.eye(dim, dtype=dtype).reshape((dim,) + image_shape)
  elif probe_vectors is None or probe_vectors.shape[0] != z.shape[0] or \
      probe_vectors.shape[2:] != image_shape:
    raise ValueError(f"Hutchinson's estimate needs probes [B, P, {image_shape}], got "
                     f"{None if probe_vectors is None else probe_vectors.shape}.")
  label_scale = float(vp.num_timesteps - 1)
  method = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}[solver]()

  def drift(t, x):  # x [H, W, C]
    log_abar = log_alpha_bar_at(vp, t)
    sigma = jnp.sqrt(-jnp.expm1(log_abar))
    eps = eps_fn(x[None], (t * label_scale)[None])[0]
    return -0.5 * beta_at(vp, t) * (x - eps / sigma)

  def solve_one(x0, vectors):  # [H, W, C], [P, H, W, C] or None
    def rhs(t, state, args):
      del args
      x, _ = state
      f, vjp_fn = jax.vjp(lambda y: drift(t, y), x)
      axes = tuple(range(1, x.ndim + 1))
      if trace == "exact":
        rows = jax.lax.map(lambda e: vjp_fn(e)[0], basis, batch_size=exact_chunk)
        div = jnp.sum(rows * basis).reshape(1)  # the sum of the Jacobian's diagonal
      else:
        rows = jax.vmap(lambda e: vjp_fn(e)[0])(vectors)  # [P, H, W, C]
        div = jnp.sum(rows * vectors, axis=axes)  # [P]
      return f, div

    num = 1 if trace == "exact" else vectors.shape[0]
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs), method, t0=jnp.asarray(t_min, dtype),
        t1=jnp.asarray(1.0, dtype), dt0=None, y0=(x0, jnp.zeros((num,), dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
    x1, delta = sol.ys[0][-1], sol.ys[1][-1]
    prior = -0.5 * jnp.sum(jnp.square(x1)) - 0.5 * dim * math.log(2 * math.pi)
    return {"logp": prior + jnp.mean(delta), "prior_logp": prior, "delta_logp": delta,
            "x1": x1, "num_steps": sol.stats["num_steps"],
            "success": sol.result == diffrax.RESULTS.successful}

  if trace == "exact":
    return jax.vmap(lambda x: solve_one(x, None))(z)
  return jax.vmap(solve_one)(z, probe_vectors)


def bits_per_dim(logp: jax.Array, dim: int) -> jax.Array:
  """Dequantized bits/dim of uint8 data from log p(z) of z = 2 (x + u) / 256 - 1."""
  return -logp / (dim * math.log(2.0)) + DEQUANTIZATION_OFFSET_BPD
