"""Inpainting with any trained model: RePaint (Lugmayr et al. 2022).

The reverse process runs as usual on the unknown pixels, while the known ones are set at
every step to a sample of the forward process at that step, q(x_t | x_0). To let the
two parts harmonize, the chain goes back up (re-noising x_{t-1} to x_t with the forward
step q(x_t | x_{t-1})) `jump_length` steps at a time, `jump_n_sample - 1` times per
block of `jump_length` steps, before going on down.

`repaint_schedule` lists the moves as levels (level k is x_k: 0 = the data, T = pure
noise); `inpaint` runs them as one compiled `lax.scan` (the network is called on the
down moves only). A mask over channels (e.g. luminance known, colour unknown) works the
same way: the mask has the images' shape (or broadcasts to it).

Randomness per example (as in `samplers`): x_T from `fold_in(keys[b], T)`; the noise of
move i from `fold_in(fold_in(keys[b], T + streams.REPAINT), i)` (then 0: the reverse
step's or the re-noising noise, 1: the known pixels' forward sample).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import streams
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def repaint_schedule(num_timesteps: int, jump_length: int = 10,
                     jump_n_sample: int = 10) -> np.ndarray:
  """The levels the chain visits, from T down to 0, with the resampling jumps.

  Going down from level T, on reaching level k j + 1 (k = 0, 1, ..., below the top
  block of `jump_length` levels) the chain goes back up `jump_length` levels and down
  again, `jump_n_sample - 1` times, then continues: Lugmayr et al.'s schedule (their
  timestep t is level t + 1 here), so the last jumps start from x_1, never from the
  finished x_0, and none reaches above T. `jump_n_sample = 1` is plain replacement (no
  resampling).

  Args:
    num_timesteps: T.
    jump_length: j >= 1, levels per jump.
    jump_n_sample: r >= 1, how many times each block of j levels is traversed downwards.

  Returns:
    int64 [M + 1] levels, starting at T and ending at 0; consecutive levels differ by 1.
  """
  if num_timesteps < 1 or jump_length < 1 or jump_n_sample < 1:
    raise ValueError(f"repaint_schedule needs T >= 1, jump_length >= 1 and "
                     f"jump_n_sample >= 1; got {num_timesteps}, {jump_length}, "
                     f"{jump_n_sample}.")
  levels = [num_timesteps]
  level = num_timesteps
  remaining = {}  # level -> jumps still to make from it
  for start in range(0, num_timesteps - jump_length, jump_length):
    remaining[start + 1] = jump_n_sample - 1
  while level > 0:
    level -= 1
    levels.append(level)
    if remaining.get(level, 0) > 0:
      remaining[level] -= 1
      for _ in range(jump_length):
        level += 1
        levels.append(level)
  return np.asarray(levels, np.int64)


def _level_coefficients(schedule: Schedule):
  """sqrt(abar) and sqrt(1 - abar) of each level 0..T ([T + 1]; level 0 is the data)."""
  one = jnp.ones((1,), schedule.dtype)
  zero = jnp.zeros((1,), schedule.dtype)
  return (jnp.concatenate([one, schedule.sqrt_alphas_cumprod]),
          jnp.concatenate([zero, schedule.sqrt_one_minus_alphas_cumprod]))


def inpaint(model_fn: ModelFn, schedule: Schedule, known: jax.Array, mask: jax.Array,
            keys: jax.Array, *, jump_length: int = 10, jump_n_sample: int = 10,
            model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
            clip_denoised: bool = True) -> jax.Array:
  """RePaint: samples x_0 whose known pixels are `known` where `mask` is 1.

  Args:
    model_fn: `model_fn(x_t [B, H, W, C], t [B] int32) -> [B, H, W, C or 2C]`.
    schedule: the diffusion's coefficients.
    known: [B, H, W, C] images in [-1, 1] (only the masked pixels matter).
    mask: 1 where a value is known, 0 where it is to be generated; the images' shape or
      broadcastable to it (e.g. [B, H, W, 1], or [1, 1, 1, C] for a channel mask).
    keys: [B] PRNG keys, one per example.
    jump_length, jump_n_sample: the resampling (see `repaint_schedule`).
    model_mean_type, model_var_type, clip_denoised: as `samplers.ancestral_sample`.

  Returns:
    [B, H, W, C] in the schedule's dtype; equal to `known` where the mask is 1.
  """
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  num_timesteps = schedule.num_timesteps
  known = jnp.asarray(known).astype(schedule.dtype)
  mask = jnp.broadcast_to(jnp.asarray(mask).astype(schedule.dtype), known.shape)
  keys = randomness.as_key_array(keys, known.shape[0])
  levels = repaint_schedule(num_timesteps, jump_length, jump_n_sample)
  moves = jnp.asarray(np.stack([levels[:-1], levels[1:]], axis=1), jnp.int32)  # [M, 2]
  sqrt_abar, sqrt_one_minus_abar = _level_coefficients(schedule)
  move_keys = randomness.derived_keys(keys, num_timesteps + streams.REPAINT,
                                      moves.shape[0])  # [B, M]
  image_shape = known.shape[1:]
  batch = known.shape[0]

  def down(x, level, step_keys):  # x_level -> x_{level - 1}
    t = level - 1  # the network's index of x_level
    t_b = jnp.full((batch,), t, jnp.int32)
    out = process.p_mean_variance(schedule, model_fn(x, t_b), x, t_b,
                                  model_mean_type=model_mean_type,
                                  model_var_type=model_var_type,
                                  clip_denoised=clip_denoised)
    noise = randomness.per_example_normal(step_keys, 0, image_shape, x.dtype)
    unknown = out.mean + jnp.where(t > 0, jnp.exp(0.5 * out.log_variance) * noise, 0.0)
    known_noise = randomness.per_example_normal(step_keys, 1, image_shape, x.dtype)
    known_t = sqrt_abar[t] * known + sqrt_one_minus_abar[t] * known_noise  # q(x_{t} | x_0)
    return mask * known_t + (1.0 - mask) * unknown

  def up(x, level, step_keys):  # x_level -> x_{level + 1}: q(x_{level+1} | x_level)
    beta = schedule.betas[level]
    noise = randomness.per_example_normal(step_keys, 0, image_shape, x.dtype)
    return jnp.sqrt(1.0 - beta) * x + jnp.sqrt(beta) * noise

  def body(x, move):
    (level, target), step_keys = move
    x = jax.lax.cond(target < level, down, up, x, level, step_keys)
    return x.astype(known.dtype), None

  x_T = randomness.per_example_normal(keys, num_timesteps, image_shape, schedule.dtype)
  x, _ = jax.lax.scan(body, x_T, ((moves[:, 0], moves[:, 1]),
                                  jnp.swapaxes(move_keys, 0, 1)))
  return mask * known + (1.0 - mask) * x
