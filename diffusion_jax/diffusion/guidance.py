"""Classifier-free guidance (Ho and Salimans 2022) as a model function every sampler takes.

A class-conditional network trained with label dropout predicts both eps(x_t, t | c) and,
with the null class, eps(x_t, t). With guidance scale s the samplers use

  out_s = out(x_t, t | null) + s (out(x_t, t | c) - out(x_t, t | null))

(s = 0: the unconditional model, s = 1: the conditional one, s > 1: guided; Ho and
Salimans' w is s - 1). `guided_model_fn` computes both branches in ONE batched network
call on [x, x] (inside whatever compiled loop calls it) and combines the mean part of the
output; a learned-variance half is taken from the conditional branch. At s = 0 and s = 1
only the branch that is needed is computed (the same program as the unguided sampler).
The combination is linear in the output, so guiding an x_0, v or mean prediction is the
same as guiding the noise prediction it implies.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# apply(x [B, H, W, C], t [B], y [B] int32) -> [B, H, W, C or 2C]
ConditionalFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_model_fn(apply: ConditionalFn, labels: jax.Array, null_label: int,
                    scale: float, mean_channels: int) -> Callable[[jax.Array, jax.Array],
                                                                  jax.Array]:
  """`model_fn(x_t, t)` of the guided predictor for fixed per-example labels.

  Args:
    apply: the conditional network.
    labels: [B] int32 class labels of the examples.
    null_label: the null class (unconditional branch).
    scale: the guidance scale s (a Python float: 0 and 1 skip a branch).
    mean_channels: C, the channels of the mean part of the output (the rest, if any, is a
      learned variance, taken from the conditional branch).
  """
  scale = float(scale)
  labels = jnp.asarray(labels, jnp.int32)
  if scale == 0.0:
    return lambda x, t: apply(x, t, jnp.full_like(labels, null_label))
  if scale == 1.0:
    return lambda x, t: apply(x, t, labels)

  def model_fn(x, t):
    batch = x.shape[0]
    both = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                 jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = both[:batch], both[batch:]
    mean = uncond[..., :mean_channels] + scale * (cond[..., :mean_channels] -
                                                  uncond[..., :mean_channels])
    return jnp.concatenate([mean, cond[..., mean_channels:]], axis=-1)

  return model_fn
