"""The paper's optimizer: Adam with a linear learning-rate warmup and global-norm clipping.

Ho et al. 2020 (Appendix B and the official code): Adam with the standard betas and
eps = 1e-8, learning rate 2e-4 (2e-5 at 256x256) reached linearly over the first 5000
steps and constant afterwards, gradients clipped to a global norm of 1.0.
"""

from __future__ import annotations

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

  Args:
    optim_config: the `optim` section (learning_rate, warmup_steps, grad_clip_norm,
      beta1, beta2, eps). `grad_clip_norm <= 0` disables clipping.
  """
  parts = []
  if optim_config.grad_clip_norm and optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
  parts.append(optax.adam(
      learning_rate=learning_rate_schedule(optim_config),
      b1=float(optim_config.beta1),
      b2=float(optim_config.beta2),
      eps=float(optim_config.eps)))
  return optax.chain(*parts)
