"""Timestep grids of the few-step samplers: where the network is evaluated, and the noise
levels each step goes between.

Host-side float64 NumPy (a grid is a compile-time constant of a sampler, like the DDIM
subsequence), so every per-step coefficient of a solver is computed in float64 and cast
once to the schedule's dtype.

Noise levels. Level (alpha, sigma) means x = alpha x_0 + sigma eps with alpha^2 +
sigma^2 = 1 (variance preserving); at timestep index t in [0, T) alpha = sqrt(alpha_bar_t)
(index 0 is the paper's t = 1). Between integer timesteps, log alpha_bar is interpolated
linearly in t: the usual continuous-time view of a discrete DDPM (Lu et al. 2022,
`NoiseScheduleVP('discrete')`, continuous time (t + 1) / T). Fractional timesteps
(Karras, log-SNR and time-quadratic grids) are fed to the network as floats (the U-Net's
sinusoidal embedding takes any real t). The log-SNR is lambda = log(alpha / sigma); the
Karras (variance-exploding) noise level is sigma / alpha = exp(-lambda).

A `Grid` of M steps holds M timesteps (decreasing) where the network is evaluated and
M + 1 levels: level i < M is that of timestep i, level M is where the sampler ends: the
noise-free x_0 (alpha = 1, sigma = 0) or timestep 0's level. One network call per step.

Spacings (`SPACINGS`), each for N steps (N network calls):
  * "uniform": t = 0, k, ..., (N - 1) k with k = T // N (the DDIM paper's; diffusers'
    DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler and HeunDiscreteScheduler call it
    "leading");
  * "even": round(linspace(0, T - 1, N)), both ends (Nichol & Dhariwal's respacing to N
    steps; diffusers' DDIMScheduler and DDPMScheduler call it "linspace");
  * "quad": the DDIM paper's quadratic subsequence, floor(linspace(0, sqrt(0.8 T), N)^2);
    its repeated timesteps are dropped, so it may have fewer than N;
  * "leading", "linspace", "trailing": the timesteps diffusers' DPMSolverMultistepScheduler
    computes under these names (steps_offset 0): leading (N, ..., 1) * (T // (N + 1));
    linspace round(linspace(0, T - 1, N + 1)) without its 0; trailing round(arange(T, 0,
    -T / N)) - 1 (the same in every diffusers scheduler). Note that diffusers'
    DDIMScheduler and DDPMScheduler use "leading" and "linspace" for other grids that
    keep t = 0 (our "uniform" and "even");
  * "time_quadratic": quadratic in continuous time (Lu et al. 2022): t + 1 = T s^2 with
    s uniform from 1 to sqrt(1 / T), N + 1 points, without the last (t = 0);
  * "logsnr": uniform in lambda from lambda(T - 1) to lambda(0), N + 1 points, without the
    last (Lu et al. 2022's 'logSNR' skip type);
  * "dpm_fast": the grid of Lu et al. (2022)'s DPM-Solver-fast for N network calls:
    K = N // 3 + 1 outer steps uniform in lambda from lambda(T - 1) to lambda(0), of
    orders 3, ..., 3 then (2, 1), (1) or (2) for N % 3 = 0, 1, 2, each split into as many
    equal lambda parts as its order; without the last point (t = 0). Singlestep
    DPM-Solver-3 with lower_order_final groups its intervals the same way;
  * "karras": Karras et al. (2022), Eq. 5: N noise levels (sigma_max^(1/rho) + i / (N - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < N, in Karras units (sigma / alpha)
    with sigma_min, sigma_max those of timesteps 0 and T - 1 (diffusers' use_karras_sigmas;
    diffusers maps these levels to timesteps by interpolating log(sigma / alpha) instead of
    log alpha_bar, a difference below 0.1 timestep).
"uniform", "even", "quad" and "karras" evaluate the network at t = 0, the others stop
above it.

End of the grid (`FINAL_STEPS`):
  * "zero": the last step lands on the noise-free x_0 (diffusers' final_sigmas_type
    "zero"; the DDIM paper's last step);
  * "t0": the last step lands on timestep 0's level (diffusers' "sigma_min"; Lu et al.'s
    discrete-time default), needing a grid that stops above t = 0; with `denoise_to_zero`
    one more network call at t = 0 returns its x_0 prediction (Lu et al.'s
    `denoise_to_zero`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

SPACINGS = ("uniform", "even", "quad", "leading", "linspace", "trailing", "time_quadratic",
            "logsnr", "dpm_fast", "karras")
INTEGER_SPACINGS = ("uniform", "even", "quad", "leading", "linspace", "trailing")
FINAL_STEPS = ("zero", "t0")
KARRAS_RHO = 7.0


class Grid(NamedTuple):
  """The M steps of a sampler (host float64 arrays).

  Attributes:
    timesteps: [M] decreasing timesteps in [0, T - 1] where the network is evaluated
      (integer-valued for the integer spacings).
    alphas: [M + 1] sqrt(alpha_bar) of each level; alphas[M] is the end (1 when
      noise-free).
    sigmas: [M + 1] sqrt(1 - alpha_bar) of each level; sigmas[M] = 0 when noise-free.
    end_timestep: the timestep of the end level (NaN when noise-free or unknown); Heun's
      corrector into a noisy end evaluates the network there.
  """
  timesteps: np.ndarray
  alphas: np.ndarray
  sigmas: np.ndarray
  end_timestep: float = float("nan")

  @property
  def num_steps(self) -> int:
    """M, the number of steps (= network calls of the DPM-Solvers and DDIM)."""
    return int(self.timesteps.shape[0])

  @property
  def noise_free_end(self) -> bool:
    """Whether the last step lands on the noise-free x_0."""
    return bool(self.sigmas[-1] == 0.0)

  @property
  def integer_timesteps(self) -> bool:
    """Whether every timestep is an integer (then the network gets int32 timesteps)."""
    return bool(np.all(self.timesteps == np.round(self.timesteps)))

  @property
  def lambdas(self) -> np.ndarray:
    """[M + 1] log-SNR log(alpha / sigma); +inf at a noise-free end."""
    with np.errstate(divide="ignore"):
      return np.log(self.alphas) - np.log(self.sigmas)

  @property
  def karras_sigmas(self) -> np.ndarray:
    """[M + 1] Karras noise levels sigma / alpha (0 at a noise-free end)."""
    return self.sigmas / self.alphas


def log_alphas_cumprod(betas: np.ndarray) -> np.ndarray:
  """[T] float64 log alpha_bar of a beta schedule."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or betas.size < 2 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("The few-step grids need at least 2 betas in (0, 1) (a schedule whose "
                     f"alpha_bar stays positive); got shape {betas.shape}.")
  return np.cumsum(np.log1p(-betas))


def level(betas: np.ndarray, timesteps) -> tuple[np.ndarray, np.ndarray]:
  """(alpha, sigma) of (possibly fractional) timesteps: log alpha_bar interpolated
  linearly between integer timesteps (exact at integers).

  Args:
    betas: [T] float64 betas.
    timesteps: array of timesteps in [0, T - 1].

  Returns:
    (alpha, sigma), float64 arrays shaped like `timesteps`.
  """
  log_abar = log_alphas_cumprod(betas)
  t = np.asarray(timesteps, np.float64)
  if np.any(t < 0) or np.any(t > log_abar.size - 1):
    raise ValueError(f"Timesteps must lie in [0, {log_abar.size - 1}], got {t}.")
  log_a = np.interp(t, np.arange(log_abar.size, dtype=np.float64), log_abar)
  return np.exp(0.5 * log_a), np.sqrt(-np.expm1(log_a))


def timestep_of_log_alpha_bar(betas: np.ndarray, log_abar_values) -> np.ndarray:
  """The inverse of `level`: timesteps whose interpolated log alpha_bar has the values
  (clamped to [0, T - 1])."""
  log_abar = log_alphas_cumprod(betas)
  index = np.arange(log_abar.size, dtype=np.float64)
  # log alpha_bar decreases with t: interpolate over the reversed (increasing) table.
  return np.interp(np.asarray(log_abar_values, np.float64), log_abar[::-1], index[::-1])


def timestep_of_log_snr(betas: np.ndarray, lambdas) -> np.ndarray:
  """Timesteps of log-SNR values lambda: alpha_bar = sigmoid(2 lambda)."""
  lambdas = np.asarray(lambdas, np.float64)
  return timestep_of_log_alpha_bar(betas, -np.logaddexp(0.0, -2.0 * lambdas))


def timestep_of_karras_sigma(betas: np.ndarray, karras_sigmas) -> np.ndarray:
  """Timesteps of Karras noise levels s = sigma / alpha: alpha_bar = 1 / (1 + s^2)."""
  return timestep_of_log_alpha_bar(betas, -np.log1p(np.square(np.asarray(karras_sigmas,
                                                                         np.float64))))


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int,
                  rho: float = KARRAS_RHO) -> np.ndarray:
  """Karras et al. (2022), Eq. 5: [N] levels from sigma_max down to sigma_min."""
  ramp = np.linspace(0.0, 1.0, num_steps) if num_steps > 1 else np.zeros(1)
  lo, hi = sigma_min**(1.0 / rho), sigma_max**(1.0 / rho)
  return (hi + ramp * (lo - hi))**rho


def dpm_fast_orders(num_calls: int) -> list[int]:
  """The orders of DPM-Solver-fast's outer steps for N network calls (Lu et al. 2022)."""
  k = num_calls // 3 + 1
  if num_calls % 3 == 0:
    return [3] * (k - 2) + [2, 1]
  return [3] * (k - 1) + [num_calls % 3]


def dpm_fast_log_snrs(betas: np.ndarray, num_calls: int) -> np.ndarray:
  """[N + 1] lambdas of the "dpm_fast" grid, from lambda(T - 1) to lambda(0)."""
  alpha, sigma = level(betas, [np.asarray(betas).shape[0] - 1, 0])
  lam = np.log(alpha) - np.log(sigma)
  orders = dpm_fast_orders(num_calls)
  outer = np.linspace(lam[0], lam[1], len(orders) + 1)
  parts = [np.linspace(a, b, o + 1)[:-1] for a, b, o in zip(outer[:-1], outer[1:], orders)]
  return np.append(np.concatenate(parts), lam[1])


def model_timesteps(betas: np.ndarray, num_steps: int, spacing: str,
                    rho: float = KARRAS_RHO) -> np.ndarray:
  """The N decreasing timesteps where a sampler of `spacing` evaluates the network.

  Args:
    betas: [T] float64 betas of the diffusion.
    num_steps: N, 1 <= N <= T (N <= T - 1 for the spacings that stop above t = 0).
    spacing: one of `SPACINGS` (see the module docstring).
    rho: the Karras grid's exponent.

  Returns:
    [N'] float64 timesteps, strictly decreasing (N' = N except for "quad").

  Raises:
    ValueError: unknown spacing, N out of range, or a grid that repeats timesteps.
  """
  num_t = int(np.asarray(betas).shape[0])
  if spacing not in SPACINGS:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; choose one of {SPACINGS}.")
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_t:
    raise ValueError(f"num_steps={num_steps!r} must be an int in [1, T={num_t}].")
  n = int(num_steps)
  if spacing == "uniform":
    seq = np.arange(n)[::-1] * (num_t // n)
  elif spacing == "even":
    seq = np.round(np.linspace(0, num_t - 1, n))[::-1]
  elif spacing == "quad":
    seq = np.unique(np.floor(np.linspace(0, np.sqrt(num_t * 0.8), n)**2))[::-1]
  elif spacing == "leading":
    seq = np.arange(n, 0, -1) * (num_t // (n + 1))
  elif spacing == "linspace":
    seq = np.round(np.linspace(0, num_t - 1, n + 1))[::-1][:-1]
  elif spacing == "trailing":
    seq = np.round(np.arange(num_t, 0, -num_t / n)) - 1
  elif spacing == "time_quadratic":
    s = np.linspace(1.0, np.sqrt(1.0 / num_t), n + 1)
    seq = (num_t * s**2 - 1.0)[:-1]
    seq[0] = num_t - 1  # exactly (s = 1)
  elif spacing == "logsnr":
    alpha, sigma = level(betas, [num_t - 1, 0])
    lam = np.log(alpha) - np.log(sigma)
    seq = timestep_of_log_snr(betas, np.linspace(lam[0], lam[1], n + 1))[:-1]
    seq[0] = num_t - 1
  elif spacing == "dpm_fast":
    seq = timestep_of_log_snr(betas, dpm_fast_log_snrs(betas, n))[:-1]
    seq[0] = num_t - 1
  else:  # karras
    alpha, sigma = level(betas, [0, num_t - 1])
    levels = karras_sigmas(sigma[0] / alpha[0], sigma[1] / alpha[1], n, rho)
    seq = timestep_of_karras_sigma(betas, levels)
    seq[0], seq[-1] = num_t - 1, 0.0
  seq = np.asarray(seq, np.float64)
  if np.any(np.diff(seq) >= 0) or seq[-1] < 0 or seq[0] > num_t - 1:
    raise ValueError(f"spacing={spacing!r} with num_steps={n} (T={num_t}) gives repeated "
                     f"or out-of-range timesteps {seq}; use fewer steps.")
  return seq


def grid_from_timesteps(betas: np.ndarray, timesteps: Sequence[float], *,
                        final_step: str = "zero", denoise_to_zero: bool = False) -> Grid:
  """A `Grid` through given timesteps (decreasing, possibly fractional).

  Args:
    betas: [T] float64 betas.
    timesteps: [N] strictly decreasing timesteps in [0, T - 1].
    final_step: "zero" (end noise-free) or "t0" (end at timestep 0's level; the last
      timestep must then be above 0).
    denoise_to_zero: with "t0", one more step: the network at t = 0, ending noise-free.

  Raises:
    ValueError: for an unknown final step, a grid that cannot end as asked, or bad
      timesteps.
  """
  seq = np.asarray(timesteps, np.float64)
  num_t = int(np.asarray(betas).shape[0])
  if (seq.ndim != 1 or seq.size == 0 or np.any(np.diff(seq) >= 0) or seq[-1] < 0 or
      seq[0] > num_t - 1):
    raise ValueError("timesteps must be a non-empty, strictly decreasing sequence in "
                     f"[0, {num_t - 1}], got {seq}.")
  if final_step not in FINAL_STEPS:
    raise ValueError(f"Unknown final_step {final_step!r}; choose one of {FINAL_STEPS}.")
  if denoise_to_zero and final_step != "t0":
    raise ValueError("denoise_to_zero adds a last network call at t = 0 after a grid that "
                     "ends at t = 0 (final_step='t0'); with final_step='zero' the grid "
                     "already ends noise-free. Set final_step='t0' or "
                     "denoise_to_zero=False.")
  alphas, sigmas = level(betas, seq)
  if final_step == "zero":
    alphas, sigmas = np.append(alphas, 1.0), np.append(sigmas, 0.0)
    return Grid(seq, alphas, sigmas)
  if seq[-1] <= 0:
    raise ValueError("final_step='t0' ends at timestep 0, but this grid already evaluates "
                     "the network there ('uniform', 'even', 'quad' and 'karras' do); use "
                     "final_step='zero', or a spacing that stops above t = 0 (linspace, "
                     "leading, trailing, time_quadratic, logsnr).")
  a0, s0 = level(betas, [0.0])
  alphas, sigmas = np.append(alphas, a0), np.append(sigmas, s0)
  if denoise_to_zero:
    seq = np.append(seq, 0.0)
    alphas, sigmas = np.append(alphas, 1.0), np.append(sigmas, 0.0)
    return Grid(seq, alphas, sigmas)
  return Grid(seq, alphas, sigmas, 0.0)


def make_grid(betas: np.ndarray, num_steps: int, spacing: str, *, final_step: str = "zero",
              denoise_to_zero: bool = False, rho: float = KARRAS_RHO) -> Grid:
  """The `Grid` of a named spacing (see the module docstring).

  Args:
    betas: [T] float64 betas of the diffusion (e.g. `schedules.get_beta_schedule`).
    num_steps: N, the number of timesteps of the spacing.
    spacing: one of `SPACINGS`.
    final_step: one of `FINAL_STEPS`.
    denoise_to_zero: with final_step "t0", one more network call at t = 0 (N + 1 calls).
    rho: the Karras grid's exponent.
  """
  return grid_from_timesteps(betas, model_timesteps(betas, num_steps, spacing, rho),
                             final_step=final_step, denoise_to_zero=denoise_to_zero)


def grid_from_karras_sigmas(timesteps: Sequence[float], karras_levels: Sequence[float],
                            end_timestep: float = float("nan")) -> Grid:
  """A `Grid` given explicitly: timesteps [M] and Karras levels sigma / alpha [M + 1].

  For grids computed elsewhere (e.g. the arrays of a diffusers scheduler, whose
  fractional timesteps follow its own interpolation); the levels, not the timesteps,
  define alpha and sigma. A last level of 0 is the noise-free end; for another,
  `end_timestep` is its timestep (needed by Heun's last corrector).
  """
  seq = np.asarray(timesteps, np.float64)
  s = np.asarray(karras_levels, np.float64)
  if seq.ndim != 1 or s.shape != (seq.size + 1,) or np.any(np.diff(s) >= 0) or s[-1] < 0:
    raise ValueError(f"Need M timesteps and M + 1 strictly decreasing levels >= 0; got "
                     f"shapes {seq.shape} and {s.shape}.")
  alphas = 1.0 / np.sqrt(1.0 + s**2)
  return Grid(seq, alphas, s * alphas, float(end_timestep))
