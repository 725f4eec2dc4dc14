"""DDIM inversion: deterministic encoding of x_0 to x_T, and decoding back (Song et al.
2021, Section 5.4).

Decoding is DDIM with eta = 0 (DPM-Solver-1) over a `timesteps.Grid` with a noise-free
end: step j goes from level j to level j + 1,
  x_{j+1} = (alpha_{j+1} / alpha_j) x_j + (sigma_{j+1} - alpha_{j+1} sigma_j / alpha_j)
            eps(x_j, t_j).
Encoding runs the steps backwards: x_j = (alpha_j / alpha_{j+1}) x_{j+1} + (sigma_j -
alpha_j sigma_{j+1} / alpha_{j+1}) eps(x_j, t_j), an implicit equation in x_j. The usual
DDIM inversion replaces eps(x_j, t_j) by eps(x_{j+1}, t_j) (one network call per step,
as diffusers' DDIMInverseScheduler: the network at the target timestep, fed the current
sample); each of `fixed_point_iterations` more calls per step re-evaluates eps at the
newest x_j (fixed-point iteration), which converges to the exact inverse of the decoder
when the steps are small. Nothing is clipped (clipping cannot be inverted).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion.schedules import Schedule
from diffusion_jax.diffusion.timesteps import Grid

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check(grid: Grid, fixed_point_iterations: int = 0) -> None:
  if not grid.noise_free_end:
    raise ValueError("DDIM inversion encodes x_0 itself: the grid must end noise-free "
                     "(final_step='zero').")
  if (not isinstance(fixed_point_iterations, (int, np.integer)) or
      fixed_point_iterations < 0):
    raise ValueError(f"fixed_point_iterations must be an int >= 0, got "
                     f"{fixed_point_iterations!r}.")


def encode(model_fn: ModelFn, schedule: Schedule, x0: jax.Array, grid: Grid, *,
           model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
           fixed_point_iterations: int = 0) -> jax.Array:
  """DDIM inversion of x_0 to the latent at the grid's first level (one compiled loop).

  Args:
    model_fn: `model_fn(x [B, H, W, C], t [B]) -> [B, H, W, C or 2C]`.
    schedule: the diffusion's coefficients (its dtype is the compute dtype).
    x0: [B, H, W, C] images in [-1, 1].
    grid: the decoder's steps (noise-free end), e.g. `make_grid(betas, 50, "uniform")`.
    model_mean_type, model_var_type: the network's parameterization.
    fixed_point_iterations: extra network calls per step refining eps (see the module
      docstring); 0 is the usual DDIM inversion.

  Returns:
    [B, H, W, C] the latent x_T at timestep grid.timesteps[0].
  """
  _check(grid, fixed_point_iterations)
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  predict = dpm_solver.network_call(model_fn, schedule, grid,
                                    model_mean_type=model_mean_type,
                                    model_var_type=model_var_type,
                                    transform=denoiser.X0Transform())
  dtype = schedule.dtype
  alpha, sigma = grid.alphas, grid.sigmas
  # Step j backwards: x_j = a_j x_{j+1} + c_j eps(x_j, t_j).
  a = jnp.asarray(alpha[:-1] / alpha[1:], dtype)
  c = jnp.asarray(sigma[:-1] - alpha[:-1] * sigma[1:] / alpha[1:], dtype)

  def body(i, x_next):
    j = grid.num_steps - 1 - i

    def refine(_, x_j):
      return (a[j] * x_next + c[j] * predict(x_j, j)[1]).astype(dtype)

    return jax.lax.fori_loop(0, fixed_point_iterations + 1, refine, x_next)

  return jax.lax.fori_loop(0, grid.num_steps, body, jnp.asarray(x0).astype(dtype))


def decode(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, grid: Grid, *,
           model_mean_type: str = "eps", model_var_type: str = "fixedlarge") -> jax.Array:
  """DDIM (eta = 0, no clipping) from the latent at the grid's first level to x_0."""
  _check(grid)
  return dpm_solver.solve(model_fn, schedule, x_T, grid, order=1, algorithm="dpmsolver",
                          model_mean_type=model_mean_type, model_var_type=model_var_type)
