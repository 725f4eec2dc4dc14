"""Timestep grids against diffusers' schedulers (the spacings they share), closed forms."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers import DDPMScheduler
from diffusers import DPMSolverMultistepScheduler
from diffusers import EulerDiscreteScheduler

import ddpm_reference as ref
from diffusion_jax.diffusion import timesteps as ts

T = 1000
BETAS = ref.betas("linear", T)
ABAR = np.cumprod(1.0 - BETAS)


def _scheduler(cls, **kwargs):
  """A diffusers scheduler of our betas, its alpha_bar in float64 (diffusers takes the
  cumulative product in float32, 1e-4 off at T = 1000)."""
  sched = cls(num_train_timesteps=T, trained_betas=BETAS, **kwargs)
  sched.alphas_cumprod = torch.from_numpy(ABAR)
  return sched


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 20, 25, 50, 999])
def test_dpm_solver_spacings_equal_diffusers(spacing, steps):
  sched = _scheduler(DPMSolverMultistepScheduler, timestep_spacing=spacing)
  sched.set_timesteps(steps)
  expected = sched.timesteps.numpy()
  if len(np.unique(expected)) < len(expected):
    with pytest.raises(ValueError, match="repeated"):
      ts.model_timesteps(BETAS, steps, spacing)
    return
  np.testing.assert_array_equal(ts.model_timesteps(BETAS, steps, spacing), expected)


@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_ddim_and_ddpm_grids_equal_diffusers(steps):
  """DDIMScheduler's "leading" is the DDIM paper's uniform grid, DDPMScheduler's
  "linspace" our "even", and "trailing" is the same in all."""
  pairs = [(DDIMScheduler, "leading", "uniform"), (DDPMScheduler, "linspace", "even"),
           (DDIMScheduler, "trailing", "trailing"), (DDPMScheduler, "trailing", "trailing")]
  for cls, theirs, ours in pairs:
    sched = _scheduler(cls, timestep_spacing=theirs)
    sched.set_timesteps(steps)
    np.testing.assert_array_equal(ts.model_timesteps(BETAS, steps, ours),
                                  sched.timesteps.numpy(), err_msg=f"{cls.__name__} {ours}")


def test_karras_levels_equal_diffusers():
  """The sigma / alpha levels of diffusers' use_karras_sigmas, and timesteps within 0.1
  of theirs (they interpolate log(sigma / alpha), we log alpha_bar)."""
  sched = _scheduler(EulerDiscreteScheduler, use_karras_sigmas=True)
  sched.set_timesteps(18)
  grid = ts.make_grid(BETAS, 18, "karras")
  np.testing.assert_allclose(grid.karras_sigmas, sched.sigmas.numpy(), rtol=2e-6)
  np.testing.assert_allclose(grid.timesteps, sched.timesteps.numpy(), atol=0.1)
  assert grid.timesteps[0] == T - 1 and grid.timesteps[-1] == 0
  # Karras et al. Eq. 5 with rho = 7 from the levels of t = T - 1 and t = 0.
  smax, smin = math.sqrt(1 / ABAR[-1] - 1), math.sqrt(1 / ABAR[0] - 1)
  i = np.arange(18)
  expected = (smax**(1 / 7) + i / 17 * (smin**(1 / 7) - smax**(1 / 7)))**7
  np.testing.assert_allclose(grid.karras_sigmas[:-1], expected, rtol=1e-12)


def test_levels_interpolate_log_alpha_bar():
  alpha, sigma = ts.level(BETAS, [0, 10, 10.25, 998.5])
  np.testing.assert_allclose(alpha[:2]**2, ABAR[[0, 10]], rtol=1e-13)
  log_mid = 0.75 * np.log(ABAR[10]) + 0.25 * np.log(ABAR[11])
  np.testing.assert_allclose(alpha[2]**2, np.exp(log_mid), rtol=1e-13)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)
  t = np.array([0.0, 3.5, 500.25, 999.0])
  a, s = ts.level(BETAS, t)
  np.testing.assert_allclose(ts.timestep_of_log_snr(BETAS, np.log(a / s)), t, atol=1e-9)
  np.testing.assert_allclose(ts.timestep_of_karras_sigma(BETAS, s / a), t, atol=1e-9)


def test_logsnr_and_time_quadratic_grids():
  grid = ts.make_grid(BETAS, 12, "logsnr", final_step="t0")
  lam = grid.lambdas
  lam_end = [0.5 * math.log(ABAR[k] / (1 - ABAR[k])) for k in (T - 1, 0)]
  np.testing.assert_allclose(lam, np.linspace(lam_end[0], lam_end[1], 13), rtol=1e-10)
  # Lu et al.: t + 1 = T s^2, s uniform from 1 to sqrt(1 / T).
  quad = ts.model_timesteps(BETAS, 10, "time_quadratic")
  s = np.linspace(1.0, math.sqrt(1 / T), 11)[:-1]
  np.testing.assert_allclose(quad, T * s**2 - 1, rtol=1e-12)


def test_final_steps():
  zero = ts.make_grid(BETAS, 5, "linspace")
  assert zero.num_steps == 5 and zero.noise_free_end and zero.sigmas[-1] == 0
  assert zero.alphas[-1] == 1 and np.isnan(zero.end_timestep)
  t0 = ts.make_grid(BETAS, 5, "linspace", final_step="t0")
  assert t0.num_steps == 5 and not t0.noise_free_end and t0.end_timestep == 0
  np.testing.assert_allclose(t0.alphas[-1]**2, ABAR[0], rtol=1e-14)
  denoised = ts.make_grid(BETAS, 5, "linspace", final_step="t0", denoise_to_zero=True)
  assert denoised.num_steps == 6 and denoised.timesteps[-1] == 0 and denoised.noise_free_end
  np.testing.assert_array_equal(zero.timesteps, t0.timesteps)
  assert zero.integer_timesteps and not ts.make_grid(BETAS, 5, "logsnr").integer_timesteps


def test_grid_errors():
  with pytest.raises(ValueError, match="Unknown timestep spacing"):
    ts.model_timesteps(BETAS, 10, "cosine")
  with pytest.raises(ValueError, match=r"num_steps=0 must be an int in \[1, T=1000\]"):
    ts.model_timesteps(BETAS, 0, "uniform")
  with pytest.raises(ValueError, match="final_step='t0' ends at timestep 0"):
    ts.make_grid(BETAS, 10, "uniform", final_step="t0")
  with pytest.raises(ValueError, match="denoise_to_zero adds a last network call"):
    ts.make_grid(BETAS, 10, "linspace", denoise_to_zero=True)
  with pytest.raises(ValueError, match="Unknown final_step"):
    ts.make_grid(BETAS, 10, "linspace", final_step="sigma_min")
  with pytest.raises(ValueError, match="strictly decreasing"):
    ts.grid_from_timesteps(BETAS, [5, 5, 1])
