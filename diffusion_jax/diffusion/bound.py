"""The full variational bound of a batch in bits/dim (the paper's NLL and Table 4).

-log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0: the prior term, one Gaussian KL per step
and the discretized decoder NLL, each in bits/dim. All T terms are computed on device in
one `lax.scan` (optionally `t_chunk` timesteps per model call), never a Python loop.

The noise of example b at timestep t is drawn from `fold_in(keys[b], t)`, so the result
of an example does not depend on the batch it is in or on how the batch is sharded.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion.schedules import Schedule


def calc_bpd(model_fn: Callable[[jax.Array, jax.Array], jax.Array], schedule: Schedule,
             x_start: jax.Array, keys: jax.Array, *, model_mean_type: str,
             model_var_type: str, clip_denoised: bool = False,
             t_chunk: int = 1) -> dict:
  """Evaluates every term of the variational bound for a batch.

  Args:
    model_fn: `model_fn(x_t [N, H, W, C], t [N]) -> [N, H, W, C or 2C]`, where N is
      B * t_chunk.
    schedule: the diffusion's coefficients.
    x_start: [B, H, W, C] data in [-1, 1] on the 256-level grid.
    keys: [B] PRNG keys, one per example.
    model_mean_type: one of `process.MEAN_TYPES`.
    model_var_type: one of `process.VAR_TYPES`.
    clip_denoised: clip the predicted x_0 to [-1, 1] (the official evaluation loop's
      default is True; both give a valid bound of the respective model).
    t_chunk: timesteps evaluated per model call (the model then sees t_chunk * B
      examples at once); must divide T.

  Returns:
    A dict: "total_bpd" [B] (the bound), "prior_bpd" [B] (L_T), "decoder_bpd" [B]
    (L_0, the t = 0 term), "kl_bpd" [B] (the sum of the KL terms t > 0),
    "terms_bpd" [B, T] (L_{t-1} for every t; column 0 is the decoder term) and
    "mse" [B, T] (the mean squared error of the predicted x_0 at every t, the
    distortion of Table 4).
  """
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)
  num_timesteps = schedule.num_timesteps
  if not isinstance(t_chunk, int) or t_chunk < 1 or num_timesteps % t_chunk:
    raise ValueError(f"t_chunk={t_chunk!r} must be a positive integer dividing "
                     f"T={num_timesteps}.")
  batch = x_start.shape[0]
  keys = randomness.as_key_array(keys, batch)
  image_shape = x_start.shape[1:]
  dtype = schedule.dtype  # The schedule's dtype decides the compute dtype.
  x_start = x_start.astype(dtype)

  def one_timestep(t):  # t: int32 scalar -> (x_t [B, ...], t [B])
    noise = randomness.per_example_normal(keys, t, image_shape, dtype)
    t_b = jnp.full((batch,), t, dtype=jnp.int32)
    return process.q_sample(schedule, x_start, t_b, noise), t_b

  def chunk_terms(carry, chunk_start):
    ts = chunk_start + jnp.arange(t_chunk, dtype=jnp.int32)  # [K]
    x_t, t_b = jax.vmap(one_timestep)(ts)  # [K, B, H, W, C], [K, B]
    x_t = x_t.reshape((t_chunk * batch,) + image_shape)
    t_b = t_b.reshape(t_chunk * batch)
    x0 = jnp.broadcast_to(x_start, (t_chunk,) + x_start.shape).reshape(x_t.shape)
    terms, pred_xstart = losses.vb_terms_bpd(
        schedule, model_fn(x_t, t_b), x0, x_t, t_b, model_mean_type=model_mean_type,
        model_var_type=model_var_type, clip_denoised=clip_denoised)
    mse = losses.mean_flat(jnp.square(pred_xstart - x0))
    return carry, (terms.reshape(t_chunk, batch), mse.reshape(t_chunk, batch))

  starts = jnp.arange(0, num_timesteps, t_chunk, dtype=jnp.int32)
  _, (terms, mse) = jax.lax.scan(chunk_terms, None, starts)  # [T/K, K, B] each
  terms_bt = terms.reshape(num_timesteps, batch).T  # [B, T]
  mse_bt = mse.reshape(num_timesteps, batch).T  # [B, T]
  prior = losses.prior_bpd(schedule, x_start)  # [B]
  return {
      "total_bpd": jnp.sum(terms_bt, axis=1) + prior,
      "prior_bpd": prior,
      "decoder_bpd": terms_bt[:, 0],
      "kl_bpd": jnp.sum(terms_bt[:, 1:], axis=1),
      "terms_bpd": terms_bt,
      "mse": mse_bt,
  }
