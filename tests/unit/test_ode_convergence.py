"""Convergence of the ODE samplers against the exact solution of the probability-flow ODE.

For data x_0 ~ N(m, s^2) (independent dimensions) the marginal at level (alpha, sigma)
is N(alpha m, alpha^2 s^2 + sigma^2) and the Bayes-optimal predictor is linear,
E[x_0 | x] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x - alpha m). The ODE then moves
each dimension along the Gaussians' quantiles: from level a to level b,
  x_b = alpha_b m + sqrt(alpha_b^2 s^2 + sigma_b^2) (x_a - alpha_a m)
        / sqrt(alpha_a^2 s^2 + sigma_a^2),
whatever the path, so every solver's error is measured exactly. The data are 16
dimensions with s from 0.05 to 0.8 (an image-like spread of scales); float64 (x64).

Orders are fitted over N = 24, 48, 96 steps uniform in log-SNR from t = T - 1 to t = 300
(an interior end: at t = 0 the solution's derivatives vanish and the fits overshoot).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import karras
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import timesteps as ts

T = 1000
BETAS = ref.betas("linear", T)
LOG_ABAR = np.log(np.cumprod(1.0 - BETAS))
SHAPE = (4, 4, 1)
M = np.linspace(-0.5, 0.5, 16).reshape(SHAPE)
S = np.geomspace(0.05, 0.8, 16).reshape(SHAPE)
X_T = np.random.default_rng(0).standard_normal((64,) + SHAPE)
STEPS = (24, 48, 96)
T_END = 300


def optimal_eps(x, t):
  """The Bayes-optimal eps at (possibly fractional) timesteps t [B]."""
  log_a = jnp.interp(t.astype(jnp.float64), jnp.arange(T, dtype=jnp.float64),
                     jnp.asarray(LOG_ABAR)).reshape(-1, 1, 1, 1)
  a, var = jnp.exp(0.5 * log_a), -jnp.expm1(log_a)
  x0 = M + a * S**2 / (a**2 * S**2 + var) * (x - a * M)
  return (x - a * x0) / jnp.sqrt(var)


def exact(x, lev_a, lev_b):
  (a_a, s_a), (a_b, s_b) = lev_a, lev_b
  return a_b * M + np.sqrt(a_b**2 * S**2 + s_b**2) * (x - a_a * M) / np.sqrt(
      a_a**2 * S**2 + s_a**2)


def interior_grid(num_steps):
  """Uniform log-SNR steps from timestep T - 1 to T_END (the end is a level)."""
  alpha, sigma = ts.level(BETAS, [T - 1, T_END])
  lam = np.linspace(*np.log(alpha / sigma), num_steps + 1)
  seq = ts.timestep_of_log_snr(BETAS, lam)
  seq[0], seq[-1] = T - 1, T_END
  return ts.Grid(seq[:-1], *ts.level(BETAS, seq), float(T_END))


SOLVERS = {  # name: (order, run(schedule, x, grid))
    "ddim": (1, functools.partial(dpm_solver.solve, order=1)),
    "dpmpp_2m": (2, functools.partial(dpm_solver.solve, order=2)),
    "dpm_2m": (2, functools.partial(dpm_solver.solve, order=2, algorithm="dpmsolver")),
    "dpmpp_3m": (3, functools.partial(dpm_solver.solve, order=3)),
    "dpm_3m": (3, functools.partial(dpm_solver.solve, order=3, algorithm="dpmsolver")),
    # diffusers' 3M: D2 at half the Taylor weight leaves a local error O(h^3).
    "diffusers_3m": (2, functools.partial(dpm_solver.solve, order=3,
                                          diffusers_multistep3=True)),
    "dpmpp_2s": (2, functools.partial(dpm_solver.solve, order=2, method="singlestep",
                                      lower_order_final=False)),
    "dpm_3s": (3, functools.partial(dpm_solver.solve, order=3, method="singlestep",
                                    algorithm="dpmsolver", lower_order_final=False)),
    "dpm_3s_taylor": (3, functools.partial(dpm_solver.solve, order=3, method="singlestep",
                                           algorithm="dpmsolver", solver_type="heun",
                                           lower_order_final=False)),
    "euler": (1, functools.partial(karras.solve, method="euler")),
    "heun": (2, functools.partial(karras.solve, method="heun")),
}


@functools.lru_cache(maxsize=None)
def errors():
  """RMS error of every solver at every N (one compiled program per N)."""
  out = {name: [] for name in SOLVERS}
  with jax.enable_x64(True):
    sched = schedules.make_schedule(BETAS, jnp.float64)
    for n in STEPS:
      grid = interior_grid(n)
      levels = list(zip(grid.alphas, grid.sigmas))
      target = exact(X_T, levels[0], levels[-1])
      run = jax.jit(lambda x, grid=grid: {
          name: fn(optimal_eps, sched, x, grid) for name, (_, fn) in SOLVERS.items()})
      for name, value in run(jnp.asarray(X_T)).items():
        out[name].append(float(np.sqrt(np.mean((np.asarray(value) - target)**2))))
  return out


@pytest.mark.parametrize("name", list(SOLVERS))
def test_error_falls_at_the_solver_order(name):
  order = SOLVERS[name][0]
  err = errors()[name]
  slope = -np.polyfit(np.log(STEPS), np.log(err), 1)[0]
  assert abs(slope - order) <= 0.3, (name, err, slope)
  assert err[-1] < 1e-2


def test_dpm_solver_pp_2m_is_10x_closer_than_ddim_at_20_steps():
  """20 network calls each, from x_T at t = T - 1 (DDIM: from its first timestep) to the
  noise-free x_0: DDIM as published (eta = 0, the paper's uniform grid t = 0, 50, ...,
  950, `samplers.ddim_sample`) and DPM-Solver++(2M) on its default grid (uniform in
  log-SNR, noise-free end)."""
  with jax.enable_x64(True):
    sched = schedules.make_schedule(BETAS, jnp.float64)
    keys = jax.random.split(jax.random.key(0), 256)
    ddim_grid = ts.make_grid(BETAS, 20, "uniform")
    dpm_grid = ts.make_grid(BETAS, 20, "logsnr")

    def run(k):
      x_ddim = samplers.initial_noise(sched, k, SHAPE)
      ddim = samplers.ddim_sample(optimal_eps, sched, k, SHAPE,
                                  timesteps=ddim_grid.timesteps[::-1].astype(np.int64),
                                  eta=0.0, clip_denoised=False)
      dpm = dpm_solver.sample(optimal_eps, sched, k, SHAPE, dpm_grid, order=2)
      return x_ddim, ddim, dpm

    x_T, ddim, dpm = (np.asarray(a) for a in jax.jit(run)(keys))
  err_ddim = np.sqrt(np.mean((ddim - exact(x_T, (ddim_grid.alphas[0], ddim_grid.sigmas[0]),
                                             (1.0, 0.0)))**2))
  err_dpm = np.sqrt(np.mean((dpm - exact(x_T, (dpm_grid.alphas[0], dpm_grid.sigmas[0]),
                                           (1.0, 0.0)))**2))
  assert err_dpm * 10 <= err_ddim, (err_dpm, err_ddim)
  assert err_ddim < 0.1  # DDIM itself is not broken
