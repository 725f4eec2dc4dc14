"""The training state: a plain pytree of step, parameters, EMA parameters, optimizer state.

`TrainState` is a `flax.struct.dataclass`, so `jax.jit`, orbax and sharding see a pytree of
arrays and nothing else; the functions that act on it are free functions.

The EMA follows the official code (`tf.train.ExponentialMovingAverage(0.9999)` without a
step-dependent warmup): it starts as a copy of the initial parameters and after every
update becomes `decay * ema + (1 - decay) * params`. After n updates the initialization
still weighs decay^n: negligible after the paper's 800k steps at 0.9999, but 1.8% after
4,000 steps at 0.999, and since the U-Net's output convolution starts at zero that share
shrinks every prediction by about as much (the probability-flow ODE then leaves visible
noise in its samples). `debias=True` (`optim.ema_debias`) drops the initialization: the
EMA after n updates is the average of the parameters after updates 1..n with weights
proportional to decay^(n - k), i.e. the update uses the decay
`decay (1 - decay^(n - 1)) / (1 - decay^n)` (0 at the first update), as Adam debiases
its moments. It depends on the step only, so resumed runs are unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (a function of `step`).

  Attributes:
    step: int32 scalar, the number of updates applied so far.
    params: the model parameters (the `params` collection of the U-Net).
    ema_params: the exponential moving average of `params`.
    opt_state: the optax state of the optimizer.
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree


def create_train_state(params: PyTree, tx: optax.GradientTransformation, *,
                       ema_params: PyTree | None = None, step: int = 0) -> TrainState:
  """Returns a state at `step` with a fresh optimizer state.

  Args:
    params: model parameters.
    tx: the optimizer (`optimizer.make_optimizer`).
    ema_params: EMA parameters; None starts the EMA as a copy of `params`.
    step: the step the state starts at (0 for a new run, or an imported checkpoint's).
  """
  if ema_params is None:
    ema_params = jax.tree_util.tree_map(jnp.array, params)  # A copy, not an alias.
  else:
    ema_params = jax.tree_util.tree_map(jnp.asarray, ema_params)
    if (jax.tree_util.tree_structure(ema_params) != jax.tree_util.tree_structure(params)):
      raise ValueError("ema_params must have the same tree structure as params.")
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      ema_params=ema_params,
      opt_state=tx.init(params))


def ema_update(ema_params: PyTree, params: PyTree, decay: float) -> PyTree:
  """Returns `decay * ema + (1 - decay) * params`, leaf by leaf, in the EMA's dtype."""
  return jax.tree_util.tree_map(
      lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)


def debiased_decay(decay: float, num_updates: jax.Array) -> jax.Array:
  """The decay of update number `num_updates` (1, 2, ...) of the debiased EMA:
  `decay (1 - decay^(n - 1)) / (1 - decay^n)`, float32 (0 at n = 1, -> decay)."""
  if not 0.0 < decay < 1.0:
    return jnp.asarray(decay, jnp.float32)
  n = jnp.asarray(num_updates, jnp.float32)
  log_decay = math.log(decay)
  # 1 - decay^k as -expm1(k log decay): exact for small k, where 1 - decay^k is tiny.
  return (decay * -jnp.expm1((n - 1.0) * log_decay) / -jnp.expm1(n * log_decay))


def apply_gradients(state: TrainState, grads: PyTree, tx: optax.GradientTransformation,
                    ema_decay: float, ema_debias: bool = False) -> TrainState:
  """Returns the state after one optimizer update and one EMA update (`ema_debias`: the
  debiased EMA of the module docstring)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = debiased_decay(ema_decay, state.step + 1) if ema_debias else ema_decay
  return TrainState(
      step=state.step + 1,
      params=params,
      ema_params=ema_update(state.ema_params, params, decay),
      opt_state=opt_state)

