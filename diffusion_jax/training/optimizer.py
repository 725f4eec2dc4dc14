"""The paper's optimizer: Adam with a linear learning-rate warmup and global-norm clipping.

Ho et al. 2020 (Appendix B and the official code): Adam with the standard betas and
eps = 1e-8, learning rate 2e-4 (2e-5 at 256x256) reached linearly over the first 5000
steps and constant afterwards, gradients clipped to a global norm of 1.0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim_config: ml_collections.ConfigDict) -> optax.Schedule:
  """Returns the linear-warmup schedule `lr * min(step / warmup_steps, 1)`.

  As the official code (`lr * min(step / warmup, 1)` with the step before the update), the
  first update (step 0) uses a learning rate of 0 when warmup_steps > 0.

  Args:
    optim_config: the `optim` section (learning_rate, warmup_steps).
  """
  peak = float(optim_config.learning_rate)
  warmup = int(optim_config.warmup_steps)
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}.")
  if warmup == 0:
    return optax.constant_schedule(peak)

  def schedule(count):
    # Written as the official code does, not as optax.linear_schedule's
    # `peak - peak * (1 - step / warmup)`, which cancels digits early in the warmup.
    return peak * jnp.minimum(jnp.asarray(count, jnp.float32) / warmup, 1.0)

  return schedule


def make_optimizer(optim_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns clip_by_global_norm -> Adam(b1, b2, eps) -> scale by the warmup schedule.

  The schedule counts the updates of this optimizer state, so a fresh optimizer state
  (e.g. after importing weights with `checkpointing.write_params_checkpoint`) warms up
  again. TF1's Adam, which the official code used, adds eps to sqrt(v) before the bias
  correction (eps_hat = eps * sqrt(1 - b2^t)); optax adds it after. The two differ only
  where sqrt(v_hat) is of the order of 1e-8.

  Args:
    optim_config: the `optim` section (learning_rate, warmup_steps, grad_clip_norm,
      beta1, beta2, eps). `grad_clip_norm <= 0` disables clipping here; a run's config
      must have grad_clip_norm > 0 (`validation.RULES`).
  """
  parts = []
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
  parts.append(optax.scale_by_adam(b1=float(optim_config.beta1), b2=float(optim_config.beta2),
                                   eps=float(optim_config.eps)))
  parts.append(optax.scale_by_learning_rate(learning_rate_schedule(optim_config)))
  return optax.chain(*parts)


def current_learning_rate(optim_config: ml_collections.ConfigDict, opt_state) -> jax.Array:
  """Returns the learning rate the next update of `opt_state` uses (float32 scalar)."""
  counts = [s.count for s in opt_state if isinstance(s, optax.ScaleByScheduleState)]
  if len(counts) != 1:
    raise ValueError("opt_state is not a state of optimizer.make_optimizer.")
  return jnp.asarray(learning_rate_schedule(optim_config)(counts[0]), jnp.float32)
