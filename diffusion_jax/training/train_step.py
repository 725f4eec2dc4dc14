"""Factory for the compiled data-parallel training update.

`make_train_step` returns `jax.jit(update)` with declared shardings over the `data` mesh:
the state is replicated and donated, the global batch is split along its leading axis,
and XLA inserts the gradient all-reduce. There is no `pmap` and no per-device code.

Randomness (STYLE: one base key folded with the step and the example index): at step `s`
the key of global example `b` is `fold_in(fold_in(fold_in(base, s), 0), b)`; its timestep
and noise come from `fold_in(key_b, 0)` and `fold_in(key_b, 1)`; dropout draws from
`fold_in(fold_in(base, s), 1)` over the global batch (threefry is partitionable, so the bits
do not depend on the sharding). A step is therefore the same function of (state, batch)
on 1 device, 8 devices or several hosts, up to the order of floating-point reductions.

A step whose loss or gradient norm is not finite leaves the state unchanged (its step
counter included) and reports `finite = False`, so no checkpoint ever holds a NaN state.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from diffusion_jax import sharding as sharding_lib
from diffusion_jax.diffusion import losses
from diffusion_jax.training import train_state as train_state_lib

PyTree = Any
# loss_fn(params, x_start [B,H,W,C], t [B] int32, noise [B,H,W,C], dropout_key,
#         labels [B] int32 or None) -> {"loss": [B], other per-example terms: [B]}
LossFn = Callable[..., Mapping[str, jax.Array]]


def make_loss_fn(model, schedule, diffusion_config) -> LossFn:
  """Returns the per-example loss of the core (`losses.training_losses`) for the U-Net.

  Args:
    model: the U-Net module (`model.apply({'params': p}, x, t, train=True, rngs=...)`).
    schedule: the diffusion's coefficients.
    diffusion_config: `config.diffusion` (model_mean_type, model_var_type, loss_type,
      hybrid_lambda), validated by `validation.validate_config`.
  """
  d = diffusion_config
  kwargs = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                loss_type=d.loss_type, hybrid_lambda=float(d.hybrid_lambda))

  def loss_fn(params, x_start, t, noise, dropout_key, labels=None):
    def model_fn(x_t, t_):
      return model.apply({"params": params}, x_t, t_, train=True, y=labels,
                         rngs={"dropout": dropout_key})
    return losses.training_losses(model_fn, schedule, x_start, t, noise, **kwargs)

  return loss_fn


def example_keys(step_key: jax.Array, batch_size: int) -> jax.Array:
  """Returns one key per global example: `fold_in(fold_in(step_key, 0), b)`, shape [B]."""
  base = jax.random.fold_in(step_key, 0)
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      base, jnp.arange(batch_size, dtype=jnp.uint32))


def sample_t_and_noise(keys: jax.Array, num_timesteps: int,
                       image_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Draws each example's timestep (uniform in [0, T)) and noise from its own key.

  Args:
    keys: [B] typed PRNG keys, one per example.
    num_timesteps: T.
    image_shape: (H, W, C).

  Returns:
    t: [B] int32; noise: [B, H, W, C] float32 standard normal.
  """
  def one(key):
    t = jax.random.randint(jax.random.fold_in(key, 0), (), 0, num_timesteps, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, 1), image_shape, jnp.float32)
    return t, noise
  return jax.vmap(one)(keys)


def drop_labels(keys: jax.Array, labels: jax.Array, rate: float,
                null_label: int) -> jax.Array:
  """Classifier-free guidance's label dropout: each example's label becomes the null
  class with probability `rate`, drawn from `fold_in(keys[b], 2)`. labels [B] -> [B]."""
  if rate <= 0.0:
    return labels
  drop = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), rate))(keys)
  return jnp.where(drop, jnp.int32(null_label), labels.astype(jnp.int32))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    num_timesteps: int, ema_decay: float, base_key: jax.Array,
                    ema_debias: bool = False,
                    mesh: Mesh, learning_rate_fn: Callable[[PyTree], jax.Array] | None = None,
                    donate: bool = True, jit_options: dict | None = None,
                    num_classes: int = 0, label_dropout: float = 0.0) -> Callable:
  """Returns `train_step(state, images) -> (new_state, metrics)`, compiled over `mesh`.

  For a class-conditional network (`num_classes` > 0) the step is
  `train_step(state, images, labels)`, labels int32 [B] in [0, num_classes), each
  replaced by the null class `num_classes` with probability `label_dropout`
  (`drop_labels`).

  Args:
    loss_fn: per-example training loss (see `LossFn`); the `loss` entry is averaged.
    tx: the optimizer.
    num_timesteps: T of the diffusion process.
    ema_decay: EMA decay per step.
    ema_debias: use the debiased EMA (`train_state.debiased_decay`).
    base_key: typed PRNG key of the run (`jax.random.key(seed)`).
    mesh: the data-parallel mesh (`sharding.make_mesh`).
    learning_rate_fn: maps the optimizer state to the learning rate of its next update
      (`functools.partial(optimizer.current_learning_rate, config.optim)`); reported as
      `learning_rate` in the metrics when given.
    donate: donate the input state's buffers (the caller must not reuse it).
    jit_options: compiler options of the program (`Ops.jit_options()` of the operations
      the loss's model uses).
    num_classes: classes of a class-conditional network (0: unconditional).
    label_dropout: the probability of training on the null class instead.

  Returns:
    The jitted step. `images` is the global batch `[B, H, W, C]` in [-1, 1], sharded on
    `data`; metrics are replicated scalars: loss, grad_norm (before clipping), finite,
    learning_rate, and the batch means of the other entries of `loss_fn`.
  """
  state_sharding = sharding_lib.replicated(mesh)
  data_sharding = sharding_lib.batch_sharding(mesh)

  def step_fn(state: train_state_lib.TrainState, images: jax.Array,
              labels: jax.Array | None = None):
    batch_size = images.shape[0]
    step_key = jax.random.fold_in(base_key, state.step)
    keys = example_keys(step_key, batch_size)
    t, noise = sample_t_and_noise(keys, num_timesteps, images.shape[1:])
    dropout_key = jax.random.fold_in(step_key, 1)
    if num_classes:
      labels = drop_labels(keys, labels, float(label_dropout), num_classes)

    def mean_loss(params):
      terms = loss_fn(params, images, t, noise, dropout_key, labels)
      means = {k: jnp.mean(v) for k, v in terms.items()}
      return means["loss"], means

    (loss, means), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A conditional, not `where(finite, new, old)` over the tree: with the state donated,
    # the select made XLA copy every leaf of the old state first (2x the update's time).
    new_state = jax.lax.cond(
        finite, lambda s: train_state_lib.apply_gradients(s, grads, tx, ema_decay,
                                                          ema_debias),
        lambda s: s, state)
    metrics = dict(means)
    metrics.update(grad_norm=grad_norm, finite=finite)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.opt_state), jnp.float32)
    return new_state, metrics

  return jax.jit(
      step_fn,
      in_shardings=((state_sharding, data_sharding, data_sharding) if num_classes
                    else (state_sharding, data_sharding)),
      out_shardings=(state_sharding, state_sharding),
      donate_argnums=(0,) if donate else (),
      compiler_options=jit_options)
