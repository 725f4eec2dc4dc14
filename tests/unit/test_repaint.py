"""RePaint inpainting (`diffusion.repaint`): its schedule of moves, known pixels kept
exactly, and, with the Bayes-optimal predictor of correlated Gaussian data, the unknown
pixels follow the closed-form conditional distribution given the known ones.

Data: 2x2 images whose 4 pixels are, in each of C channels independently, N(mu, Sigma)
with correlated pixels (the channels are independent copies, so one image holds C draws of
the 4-pixel law and few keys give many draws). For such data
E[x_0 | x_t] = mu + sqrt(abar) Sigma (abar Sigma + (1 - abar) I)^-1 (x_t - sqrt(abar) mu)
is the optimal denoiser (written here in NumPy, from the formula), and the conditional of
the unknown pixels u given the known ones k is N(mu_u + S_uk S_kk^-1 (k - mu_k),
S_uu - S_uk S_kk^-1 S_ku).

RePaint is an approximation: it replaces the known pixels and resamples instead of
conditioning the reverse process, and reaches the conditional only in the limit of many
steps and resamplings (with T = 800, jumps of 8, 40 resamplings the error is still about
1-2% of the mean and std here). The tests therefore check (a) that our implementation is
RePaint: the same law as an independent float64 NumPy implementation of the paper's
Algorithm 1, and (b) that it does what RePaint is for: the unknown pixels' mean and std
are within 2% of the data range [-1, 1] of the closed-form conditional (0.04), where
plain replacement of the known pixels (no resampling) misses the mean by 3x that.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import repaint
from diffusion_jax.diffusion import schedules

MU = np.array([0.3, -0.2, 0.1, 0.0])
SIGMA = 0.25 * np.array([[1.0, 0.6, 0.5, 0.3], [0.6, 1.0, 0.4, 0.5],
                         [0.5, 0.4, 1.0, 0.6], [0.3, 0.5, 0.6, 1.0]])
KNOWN = np.array([0.8, 0.5])  # pixels 0 and 1 known, 2 and 3 to generate


def _schedule(num_timesteps):
  scale = 1000 / num_timesteps  # the paper's linear betas, stretched to T steps
  betas = schedules.get_beta_schedule("linear", num_timesteps, 1e-4 * scale, 0.02 * scale)
  return schedules.make_schedule(betas), betas


def _optimal_eps(betas):
  """model_fn(x_t [B, 2, 2, C], t) of the Bayes-optimal eps predictor (precomputed gains)."""
  abar = np.cumprod(1.0 - betas)
  gains = np.stack([np.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * np.eye(4))
                    for a in abar])  # [T, 4, 4]
  gains, abar_j = jnp.asarray(gains, jnp.float32), jnp.asarray(abar, jnp.float32)
  mu = jnp.asarray(MU, jnp.float32)[:, None]  # [4, 1]

  def model_fn(x, t):
    xf = x.reshape(x.shape[0], 4, -1)  # [B, 4 pixels, C]
    a = abar_j[t][:, None, None]
    x0 = mu + jnp.einsum("bij,bjc->bic", gains[t], xf - jnp.sqrt(a) * mu)
    return ((xf - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)).reshape(x.shape)

  return model_fn


def _conditional():
  s_kk, s_uk, s_uu = SIGMA[:2, :2], SIGMA[2:, :2], SIGMA[2:, 2:]
  mean = MU[2:] + s_uk @ np.linalg.solve(s_kk, KNOWN - MU[:2])
  cov = s_uu - s_uk @ np.linalg.solve(s_kk, s_uk.T)
  return mean, np.sqrt(np.diag(cov))


def _inpaint(num_timesteps, jump_length, jump_n_sample, n, copies=64, seed=0):
  """n x copies draws of the 4 pixels, [n * copies, 4]."""
  schedule, betas = _schedule(num_timesteps)
  known = jnp.broadcast_to(jnp.asarray([KNOWN[0], KNOWN[1], 0.0, 0.0],
                                       jnp.float32).reshape(1, 2, 2, 1), (n, 2, 2, copies))
  mask = jnp.asarray([1.0, 1.0, 0.0, 0.0], jnp.float32).reshape(1, 2, 2, 1)
  keys = jax.random.split(jax.random.key(seed), n)
  run = jax.jit(lambda k: repaint.inpaint(
      _optimal_eps(betas), schedule, known, mask, k, jump_length=jump_length,
      jump_n_sample=jump_n_sample, model_var_type="fixedlarge", clip_denoised=False))
  out = np.asarray(run(keys)).reshape(n, 4, copies)
  return out.transpose(0, 2, 1).reshape(-1, 4)


def test_schedule_of_moves():
  levels = repaint.repaint_schedule(20, jump_length=3, jump_n_sample=3)
  assert levels[0] == 20 and levels[-1] == 0 and levels.max() == 20
  assert set(np.abs(np.diff(levels))) == {1}
  # Jumps start at levels 1, 4, ..., 16 (Lugmayr et al.'s timesteps 0, 3, ..., 15; none
  # in the top block) and go back up 3 levels, twice each: every level from 2 to 19 is
  # left downwards 3 times; level 20 (x_T) and level 1 (into x_0) once.
  downs = np.bincount(levels[:-1][np.diff(levels) < 0], minlength=21)
  for level in range(1, 21):
    expected = 3 if 2 <= level <= 19 else 1
    assert downs[level] == expected, (level, downs[level])
  assert levels[-2] == 1  # the last move is x_1 -> x_0, never a jump from x_0
  np.testing.assert_array_equal(repaint.repaint_schedule(5, 2, 1), [5, 4, 3, 2, 1, 0])
  with pytest.raises(ValueError, match="jump_length"):
    repaint.repaint_schedule(10, 0, 2)


def _numpy_repaint(num_timesteps, jump_length, jump_n_sample, n, seed=0):
  """RePaint (Lugmayr et al. 2022, Algorithm 1) in float64 NumPy with the exact Gaussian
  denoiser and sigma_t^2 = beta_t: [n, 4] draws of the pixels."""
  rng = np.random.default_rng(seed)
  _, betas = _schedule(num_timesteps)
  abar = np.cumprod(1.0 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  known = np.append(KNOWN, [0.0, 0.0])
  x = rng.standard_normal((n, 4))
  # The moves, written from the algorithm: down T..1, and after each block of
  # jump_length levels (none from the top block) back up and down again, r - 1 times.
  levels = [num_timesteps]
  # Lugmayr et al.'s timestep t (the network's index) is level t + 1.
  jumps = {start + 1: jump_n_sample - 1
           for start in range(0, num_timesteps - jump_length, jump_length)}
  while levels[-1] > 0:
    levels.append(levels[-1] - 1)
    if jumps.get(levels[-1], 0) > 0:
      jumps[levels[-1]] -= 1
      levels.extend(levels[-1] + 1 + np.arange(jump_length))
  for level, target in zip(levels[:-1], levels[1:]):
    if target > level:  # x_{t+1} ~ q(x_{t+1} | x_t)
      x = np.sqrt(1 - betas[level]) * x + np.sqrt(betas[level]) * rng.standard_normal(x.shape)
      continue
    t = level - 1  # from x_level to x_t
    a, a_prev = abar[t], abar_prev[t]
    gain = np.sqrt(a) * SIGMA @ np.linalg.inv(a * SIGMA + (1 - a) * np.eye(4))
    x0 = MU + (x - np.sqrt(a) * MU) @ gain.T
    mean = (betas[t] * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - betas[t]) * x) / (
        1 - a)
    unknown = mean + (np.sqrt(betas[t]) * rng.standard_normal(x.shape) if t > 0 else 0.0)
    known_t = np.sqrt(a_prev) * known + np.sqrt(1 - a_prev) * rng.standard_normal(x.shape)
    x = np.concatenate([known_t[:, :2], unknown[:, 2:]], axis=1)
  return x


def test_the_same_law_as_an_independent_implementation_and_the_known_pixels_exact():
  ours = _inpaint(60, 3, 5, 64, copies=512)  # 32768 draws
  np.testing.assert_array_equal(ours[:, :2], np.broadcast_to(np.float32(KNOWN),
                                                             (len(ours), 2)))
  reference = _numpy_repaint(60, 3, 5, 32_768)
  for a, b in ((ours[:, 2:], reference[:, 2:]),):
    error = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))  # of the difference of means
    assert np.all(np.abs(a.mean(0) - b.mean(0)) < 4 * error), (a.mean(0), b.mean(0))
    np.testing.assert_allclose(a.std(0), b.std(0), rtol=4 * np.sqrt(2 / len(a)))
  np.testing.assert_allclose(np.corrcoef(ours[:, 2], ours[:, 3])[0, 1],
                             np.corrcoef(reference[:, 2], reference[:, 3])[0, 1], atol=0.03)


def test_unknown_pixels_follow_the_gaussian_conditional():
  want_mean, want_std = _conditional()
  samples = _inpaint(100, 1, 20, 64, copies=512)[:, 2:]
  tolerance = 0.02 * 2.0  # 2% of the data range [-1, 1]
  np.testing.assert_allclose(samples.mean(0), want_mean, atol=tolerance)
  np.testing.assert_allclose(samples.std(0), want_std, atol=tolerance)
  # Plain replacement of the known pixels (no resampling) is far off: the resampling is
  # what harmonizes the generated pixels with the known ones.
  plain = _inpaint(100, 1, 1, 64, copies=512)[:, 2:].mean(0)
  assert np.all(np.abs(plain - want_mean) > 3 * tolerance), (plain, want_mean)


def test_a_channel_mask_works_the_same_way():
  """Colorization-style: one channel known everywhere, the others generated."""
  schedule, betas = _schedule(50)
  model = _optimal_eps(betas)
  # Channels as the 4 correlated variables of a 1x1 image.
  model_fn = lambda x, t: model(x.reshape(-1, 2, 2, 1), t).reshape(x.shape)
  known = jnp.broadcast_to(jnp.asarray([KNOWN[0], KNOWN[1], 0, 0], jnp.float32),
                           (64, 1, 1, 4))
  mask = jnp.asarray([1.0, 1.0, 0.0, 0.0], jnp.float32)  # broadcasts over the images
  out = repaint.inpaint(model_fn, schedule, known, mask, jax.random.split(
      jax.random.key(1), 64), jump_length=2, jump_n_sample=2, clip_denoised=False)
  np.testing.assert_array_equal(np.asarray(out)[..., :2],
                                np.broadcast_to(np.float32(KNOWN), (64, 1, 1, 2)))
  assert np.asarray(out)[..., 2:].std() > 0.1
