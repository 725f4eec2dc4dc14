"""The training state: a plain pytree of step, parameters, EMA parameters, optimizer state.

`TrainState` is a `flax.struct.dataclass`, so `jax.jit`, orbax and sharding see a pytree of
arrays and nothing else; the functions that act on it are free functions.

The EMA follows the official code (`tf.train.ExponentialMovingAverage(0.9999)` without a
step-dependent warmup): it starts as a copy of the initial parameters and after every
update becomes `decay * ema + (1 - decay) * params`.
"""

from __future__ import annotations

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


def apply_gradients(state: TrainState, grads: PyTree, tx: optax.GradientTransformation,
                    ema_decay: float) -> TrainState:
  """Returns the state after one optimizer update and one EMA update."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(
      step=state.step + 1,
      params=params,
      ema_params=ema_update(state.ema_params, params, ema_decay),
      opt_state=opt_state)

