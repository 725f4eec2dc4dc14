"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b) on a discrete DDPM.

Both solve the probability-flow ODE of the diffusion exactly in its linear part and
approximate the network's prediction by a polynomial in the log-SNR lambda (an
exponential integrator). DPM-Solver++ ("dpmsolver++") integrates the data prediction
x_0(x, lambda), DPM-Solver ("dpmsolver") the noise prediction eps(x, lambda); both work
with every parameterization of the network (its output is converted, see `denoiser`).

Two ways to reach order k > 1, as in the papers and diffusers:
  * multistep: each step uses the predictions of the k - 1 previous steps (one network
    call per step; the first steps use lower orders while the history fills up);
  * singlestep: a step of order k spans k grid intervals and evaluates the network at
    the k - 1 intermediate grid levels (diffusers' `DPMSolverSinglestepScheduler`
    structure: its orders per grid interval come from `singlestep_orders`).
Every variant is one network call per grid interval, so a `timesteps.Grid` of M steps
costs M calls. The step into a noise-free end is always first order (it returns the
data prediction), as in diffusers.

Second-order formulas (`SOLVER_TYPES`): "midpoint" (diffusers' default; Lu et al.'s
DPM-Solver-2 and DPM-Solver++(2M)) or "heun" (diffusers' name for the Taylor form). The
third-order multistep formula is the same for all; a third-order singlestep group ends
with Lu et al.'s DPM-Solver-3 update ("midpoint") or the full Taylor form ("heun"), its
intermediate second-order update in the form named. "lu" is Lu et al.'s reference code
(`solver_type='dpmsolver'`): midpoint, except that a third-order group's intermediate
update is in the Taylor form (their DPM-Solver-3). With `lower_order_final` and fewer
than 15 steps, the last multistep steps use orders 1 and 2 (diffusers' rule).

Third-order multistep: with the backward differences D1_0 = (m_i - m_{i-1}) / r0,
D1_1 = (m_{i-1} - m_{i-2}) / r1, the second-derivative term of the Taylor expansion is
h^2 x''(lambda) ~ 2 (D1_0 - D1_1) / (r0 + r1) (as the singlestep Taylor form has it).
diffusers' `DPMSolverMultistepScheduler` (and Lu et al.'s reference code) use half of
it, which leaves a local error of order h^3: their 3M converges at order 2, ours at
order 3 (`tests/unit/test_ode_convergence.py` measures both). `diffusers_multistep3=True`
reproduces theirs (for the parity tests). Either way the first steps of a multistep
solver are lower order (warm-up), which costs little when sampling starts at T - 1.

SDE-DPM-Solver++ ("sde-dpmsolver++", Lu et al. 2022b, Section 5 and Appendix; diffusers'
`algorithm_type="sde-dpmsolver++"`, k-diffusion's "DPM++ 2M SDE") solves the reverse SDE
instead, multistep of order 1 or 2, with data prediction: from level s to t (h =
lambda_t - lambda_s)
  x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 + c D1)
        + sigma_t sqrt(1 - e^-2h) z,
c = 1/2 ("midpoint") or ((1 - e^-2h) / (-2h) + 1) / (1 - e^-2h) ("heun"). Its first order
on consecutive timesteps is the DDPM posterior step q(x_{t-1} | x_t, x_0-hat) with the
variance beta-tilde (fixedsmall). The noise z of step i of example b comes from
`fold_in(keys[b], i)` (x_T from `fold_in(keys[b], T)`), so a sample is a function of its
own key.

Each update is a linear combination x_next = a_i x_base + sum_j c_ij m_{i-j} (+ n_i z_i
for the SDE) of the current (multistep) or group-start (singlestep) sample and the
newest three predictions; the coefficients are computed once, in float64 on the host,
from the papers' formulas (`update_coefficients`), and the sampler is one
`lax.fori_loop`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion.schedules import Schedule
from diffusion_jax.diffusion.timesteps import Grid

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++")
SDE_ALGORITHMS = ("sde-dpmsolver++",)
METHODS = ("multistep", "singlestep")
SOLVER_TYPES = ("midpoint", "heun", "lu")
LOWER_ORDER_FINAL_BELOW = 15  # diffusers: lower orders at the end only below 15 steps


class Coefficients(NamedTuple):
  """Per-step update coefficients (host float64).

  Attributes:
    base: [M] multiplies the base sample (current, or the group start's).
    reset: [M] bool, the base sample becomes the current one at this step.
    model: [M, K] multiply the newest K predictions (newest first).
    orders: [M] int, the order of each step.
    noise: [M] the standard deviation of the noise each step adds (0 for the ODE).
  """
  base: np.ndarray
  reset: np.ndarray
  model: np.ndarray
  orders: np.ndarray
  noise: np.ndarray


def check_options(order: int, algorithm: str, method: str, solver_type: str) -> None:
  """Raises ValueError naming the choices for an unknown option."""
  if order not in (1, 2, 3):
    raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}.")
  if algorithm not in ALGORITHMS:
    raise ValueError(f"Unknown DPM-Solver algorithm {algorithm!r}; choose one of "
                     f"{ALGORITHMS}.")
  if method not in METHODS:
    raise ValueError(f"Unknown DPM-Solver method {method!r}; choose one of {METHODS}.")
  if solver_type not in SOLVER_TYPES:
    raise ValueError(f"Unknown solver_type {solver_type!r}; choose one of {SOLVER_TYPES}.")
  if algorithm in SDE_ALGORITHMS and (order > 2 or method != "multistep"
                                      or solver_type == "lu"):
    raise ValueError(f"{algorithm} is multistep of order 1 or 2 with solver_type midpoint "
                     f"or heun; got order={order}, method={method!r}, "
                     f"solver_type={solver_type!r}.")


def multistep_orders(num_steps: int, order: int, lower_order_final: bool,
                     noise_free_end: bool) -> np.ndarray:
  """[M] orders of the multistep solver: warm-up min(order, i + 1), lower at the end."""
  orders = np.minimum(order, np.arange(num_steps) + 1)
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
    if num_steps >= 2:
      orders[-2] = min(orders[-2], 2)
    orders[-1] = 1
  if noise_free_end:
    orders[-1] = 1
  return orders


def singlestep_orders(num_steps: int, order: int, lower_order_final: bool,
                      noise_free_end: bool) -> np.ndarray:
  """[M] position of each grid interval in its singlestep group (1 starts a group; a
  group of order k is k intervals), as diffusers' `get_order_list`.

  Raises:
    ValueError: without `lower_order_final`, when M does not divide by the order.
  """
  m, k = num_steps, order
  if not lower_order_final and m % k:
    raise ValueError(f"Singlestep DPM-Solver of order {k} over {m} steps needs "
                     f"lower_order_final=True (or a number of steps divisible by {k}).")
  if k == 1:
    orders = [1] * m
  elif not lower_order_final:
    orders = list(range(1, k + 1)) * (m // k)
  elif k == 2:
    orders = [1, 2] * (m // 2 - 1) + [1, 1] if m % 2 == 0 else [1, 2] * (m // 2) + [1]
  else:
    tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[m % 3]
    orders = [1, 2, 3] * (m // 3 - (m % 3 == 0)) + tail
  orders = np.asarray(orders[:m], np.int64)
  if noise_free_end:
    orders[-1] = 1
  return orders


def _terms(grid: Grid, s: np.ndarray, t: np.ndarray, algorithm: str):
  """Exponential-integrator terms of the steps from levels s to levels t (arrays).

  Returns (a, phi1, psi, chi, h, noise): x_t = a x_s + phi1 D0 + psi D1 + chi D2
  (+ noise z for the SDE) in the papers' notation (psi, chi are those of the Taylor form;
  not finite into a noise-free end).
  """
  alpha, sigma, lam = grid.alphas, grid.sigmas, grid.lambdas
  a_s, s_s, a_t, s_t = alpha[s], sigma[s], alpha[t], sigma[t]
  h = lam[t] - lam[s]
  finite = np.isfinite(h)
  hf = np.where(finite, h, 1.0)
  with np.errstate(all="ignore"):
    noise = np.zeros(np.shape(h))
    if algorithm == "sde-dpmsolver++":  # e^-h = (alpha_s sigma_t) / (sigma_s alpha_t)
      a = np.where(finite, s_t / s_s * np.exp(-hf), 0.0)
      phi1 = np.where(finite, -a_t * np.expm1(-2.0 * hf), a_t)
      psi = a_t * (np.expm1(-2.0 * hf) / (2.0 * hf) + 1.0)
      chi = np.full(np.shape(h), np.nan)
      noise = np.where(finite, s_t * np.sqrt(-np.expm1(-2.0 * hf)), 0.0)
    elif algorithm == "dpmsolver++":
      a = s_t / s_s
      phi1 = np.where(finite, -a_t * np.expm1(-hf), a_t - s_t * a_s / s_s)
      psi = a_t * (np.expm1(-hf) / hf + 1.0)
      chi = -a_t * ((np.expm1(-hf) + hf) / hf**2 - 0.5)
    else:
      a = a_t / a_s
      phi1 = np.where(finite, -s_t * np.expm1(hf), s_t - a_t * s_s / a_s)
      psi = -s_t * (np.expm1(hf) / hf - 1.0)
      chi = -s_t * ((np.expm1(hf) - hf) / hf**2 - 0.5)
  return (a, phi1, np.where(finite, psi, np.nan), np.where(finite, chi, np.nan), h,
          noise)


def update_coefficients(grid: Grid, *, order: int, algorithm: str = "dpmsolver++",
                        method: str = "multistep", solver_type: str = "midpoint",
                        lower_order_final: bool = True,
                        diffusers_multistep3: bool = False) -> Coefficients:
  """The per-step coefficients of a DPM-Solver variant on `grid` (host float64).

  The options are those of `solve`.
  """
  check_options(order, algorithm, method, solver_type)
  m = grid.num_steps
  lam = grid.lambdas
  steps = np.arange(m)
  coef = np.zeros((m, order))
  if method == "multistep":
    orders = multistep_orders(m, order, lower_order_final, grid.noise_free_end)
    starts = steps
  else:
    orders = singlestep_orders(m, order, lower_order_final, grid.noise_free_end)
    starts = steps - orders + 1
  a, phi1, psi, chi, h, noise = _terms(grid, starts, steps + 1, algorithm)
  psi2 = 0.5 * phi1 if solver_type in ("midpoint", "lu") else psi
  if solver_type == "lu" and method == "singlestep":  # Taylor inside groups of three
    inside = (orders == 2) & (np.append(orders[1:], 0) == 3)
    psi2 = np.where(inside, psi, psi2)
  with np.errstate(all="ignore"):
    if method == "multistep":
      r0 = (lam[steps] - lam[np.maximum(steps - 1, 0)]) / h
      r1 = (lam[np.maximum(steps - 1, 0)] - lam[np.maximum(steps - 2, 0)]) / h
    else:
      r0 = (lam[steps] - lam[starts]) / h
      r1 = (lam[np.maximum(steps - 1, 0)] - lam[starts]) / h
  for k in range(order):  # The three formulas, each for all steps at once.
    rows = orders == k + 1
    if k == 0:
      coef[rows, 0] = phi1[rows]
    elif k == 1:
      c = psi2[rows] / r0[rows]
      if method == "multistep":  # D0 = m_i, D1 = (m_i - m_{i-1}) / r0
        coef[rows, 0], coef[rows, 1] = phi1[rows] + c, -c
      else:  # D0 = m_{i-1} (group start), D1 = (m_i - m_{i-1}) / r0
        coef[rows, 0], coef[rows, 1] = c, phi1[rows] - c
    else:
      p, x, q0, q1 = phi1[rows], psi[rows], r0[rows], r1[rows]
      chi_k = chi[rows]
      if method == "multistep":  # D2 = w (D1_0 - D1_1) / (r0 + r1), w = 2 (Taylor)
        w = 1.0 if diffusers_multistep3 else 2.0
        big_a = x * (1 + q0 / (q0 + q1)) + w * chi_k / (q0 + q1)
        big_b = -x * q0 / (q0 + q1) - w * chi_k / (q0 + q1)
        coef[rows, 0] = p + big_a / q0
        coef[rows, 1] = -big_a / q0 + big_b / q1
        coef[rows, 2] = -big_b / q1
      elif solver_type in ("midpoint", "lu"):  # D0 = m_s, D1_1 = (m_i - m_s) / r0
        coef[rows, 0], coef[rows, 1], coef[rows, 2] = x / q0, 0.0, p - x / q0
      else:  # Taylor: D1, D2 from the three points
        big_p = (x * q0 - 2 * chi_k) / (q0 - q1)
        big_q = (-x * q1 + 2 * chi_k) / (q0 - q1)
        coef[rows, 0], coef[rows, 1] = big_q / q0, big_p / q1
        coef[rows, 2] = p - big_p / q1 - big_q / q0
  if not np.all(np.isfinite(coef)) or not np.all(np.isfinite(a)):
    raise ValueError("The grid has repeated noise levels (a zero-length step); use a grid "
                     "with strictly decreasing levels.")
  reset = np.ones(m, bool) if method == "multistep" else orders == 1
  return Coefficients(base=a, reset=reset, model=coef, orders=orders, noise=noise)


def check_grid_timesteps(grid: Grid, schedule: Schedule, model_mean_type: str) -> None:
  """Raises ValueError when the grid does not fit the schedule or the parameterization."""
  num_t = schedule.num_timesteps
  if grid.timesteps.size and (grid.timesteps[0] > num_t - 1 or grid.timesteps[-1] < 0):
    raise ValueError(f"Grid timesteps {grid.timesteps} lie outside [0, {num_t - 1}].")
  if model_mean_type == "mean" and not grid.integer_timesteps:
    raise ValueError("model_mean_type 'mean' predicts the posterior mean of one discrete "
                     "step and works only on integer timesteps; choose an integer spacing "
                     "(uniform, even, quad, leading, linspace, trailing).")


def network_call(model_fn: ModelFn, schedule: Schedule, grid: Grid, *,
                 model_mean_type: str, model_var_type: str,
                 transform: denoiser.X0Transform):
  """`predict(x, i) -> (x0, eps)`: the network at grid step i (a traced int).

  The timesteps are int32 for an integer grid and the schedule's dtype otherwise.
  """
  check_grid_timesteps(grid, schedule, model_mean_type)
  dtype = schedule.dtype
  t_dtype = jnp.int32 if grid.integer_timesteps else dtype
  times = jnp.asarray(grid.timesteps.astype(np.float64), dtype).astype(t_dtype)
  alphas = jnp.asarray(grid.alphas, dtype)
  sigmas = jnp.asarray(grid.sigmas, dtype)

  def predict(x, i):
    t_b = jnp.full((x.shape[0],), times[i], dtype=t_dtype)
    return denoiser.predict(model_fn(x, t_b), x, alphas[i], sigmas[i],
                            model_mean_type=model_mean_type, model_var_type=model_var_type,
                            transform=transform, schedule=schedule,
                            t=t_b if model_mean_type == "mean" else None)

  return predict


def solve(model_fn: ModelFn, schedule: Schedule, x: jax.Array, grid: Grid, *,
          order: int = 2, algorithm: str = "dpmsolver++", method: str = "multistep",
          solver_type: str = "midpoint", lower_order_final: bool = True,
          diffusers_multistep3: bool = False,
          model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
          transform: denoiser.X0Transform = denoiser.X0Transform(),
          trajectory: bool = False, noise_keys: jax.Array | None = None) -> jax.Array:
  """Integrates the probability-flow ODE (or, for "sde-dpmsolver++", the reverse SDE)
  from x at the grid's first level to its end.

  Args:
    model_fn: `model_fn(x [B, H, W, C], t [B]) -> [B, H, W, C or 2C]`.
    schedule: the diffusion's coefficients (its dtype is the compute dtype).
    x: [B, H, W, C] the sample at level 0 of the grid (timestep grid.timesteps[0]).
    grid: the steps (`timesteps.make_grid`).
    order: 1 (DDIM), 2 or 3.
    algorithm: "dpmsolver++" (data prediction), "dpmsolver" (noise prediction) or
      "sde-dpmsolver++" (data prediction, the reverse SDE).
    method: "multistep" or "singlestep".
    solver_type: "midpoint", "heun" or "lu" (see the module docstring).
    lower_order_final: lower orders for the last steps (see the module docstring).
    diffusers_multistep3: diffusers' third-order multistep step (see the module
      docstring); for parity tests.
    model_mean_type, model_var_type: the network's parameterization.
    transform: clipping / dynamic thresholding of the predicted x_0.
    trajectory: also return the sample at every level.
    noise_keys: [B] PRNG keys of the SDE's noise (step i of example b draws from
      `fold_in(noise_keys[b], i)`); required for "sde-dpmsolver++", unused otherwise.

  Returns:
    [B, H, W, C] the sample at the grid's end, in the schedule's dtype; with
    `trajectory`, [M + 1, B, H, W, C]: the samples at levels 0 (x) to M (the end).
  """
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  denoiser.check_x0_transform(transform)
  coefs = update_coefficients(grid, order=order, algorithm=algorithm, method=method,
                              solver_type=solver_type, lower_order_final=lower_order_final,
                              diffusers_multistep3=diffusers_multistep3)
  predict = network_call(model_fn, schedule, grid, model_mean_type=model_mean_type,
                         model_var_type=model_var_type, transform=transform)
  sde = algorithm in SDE_ALGORITHMS
  if sde and noise_keys is None:
    raise ValueError(f"{algorithm} draws noise: pass noise_keys (one key per example).")
  dtype = schedule.dtype
  noise_std = jnp.asarray(coefs.noise, dtype)
  base = jnp.asarray(coefs.base, dtype)
  model_coefs = jnp.asarray(coefs.model, dtype)  # [M, K]
  reset = jnp.asarray(coefs.reset)
  history = coefs.model.shape[1]
  singlestep = method == "singlestep"
  x = jnp.asarray(x).astype(dtype)

  def body(i, carry):
    x, x_base, hist, states = carry
    x0, eps = predict(x, i)
    m = eps if algorithm == "dpmsolver" else x0
    hist = jnp.concatenate([m[None].astype(dtype), hist[:-1]])  # [K, B, H, W, C]
    if singlestep:
      x_base = jnp.where(reset[i], x, x_base)
    else:
      x_base = x
    update = jnp.tensordot(model_coefs[i], hist, axes=1)
    x = base[i] * x_base + update
    if sde:
      z = randomness.per_example_normal(noise_keys, i, x.shape[1:], dtype)
      x = x + noise_std[i] * z
    x = x.astype(dtype)
    return x, x_base, hist, record(states, i + 1, x)

  hist0 = jnp.zeros((history,) + x.shape, dtype)
  states = record(new_trajectory(x, grid.num_steps, trajectory), 0, x)
  x, _, _, states = jax.lax.fori_loop(0, grid.num_steps, body, (x, x, hist0, states))
  return states if trajectory else x


def new_trajectory(x: jax.Array, num_steps: int, enabled: bool) -> jax.Array:
  """A [M + 1, B, ...] buffer for the states at every level ([0] when not `enabled`)."""
  return jnp.zeros(((num_steps + 1) if enabled else 0,) + x.shape, x.dtype)


def record(states: jax.Array, i, x: jax.Array) -> jax.Array:
  """states[i] = x (a no-op on an empty buffer)."""
  if states.shape[0] == 0:
    return states
  return jax.lax.dynamic_update_index_in_dim(states, x.astype(states.dtype), i, axis=0)


def sample(model_fn: ModelFn, schedule: Schedule, keys: jax.Array, shape: Sequence[int],
           grid: Grid, **kwargs) -> jax.Array:
  """DPM-Solver(++) samples: x_T ~ N(0, I) from fold_in(keys[b], T), then `solve` (the
  SDE's noise of step i from fold_in(keys[b], i)).

  Args:
    model_fn, schedule, grid: as `solve`.
    keys: [B] PRNG keys, one per sample (x_T of example b from fold_in(keys[b], T), so a
      sample depends on its own key only).
    shape: the per-sample shape (H, W, C).
    **kwargs: the options of `solve`.

  Returns:
    [B, H, W, C] samples in the schedule's dtype.
  """
  keys = randomness.as_key_array(keys)
  x_T = samplers.initial_noise(schedule, keys, shape)
  if kwargs.get("algorithm") in SDE_ALGORITHMS:
    kwargs["noise_keys"] = keys
  return solve(model_fn, schedule, x_T, grid, **kwargs)
