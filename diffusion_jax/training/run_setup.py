"""What a run builds from its config: operations, model, schedule, optimizer, train state.

Shared by training (`train.py`), the evaluation jobs (`evaluation.restore`) and the
checkpoint tools. The operations of the network (`ops.from_config`: the kernel policy)
are resolved once per program from the config and the mesh and passed to the U-Net.

Keys come from the table of `diffusion_jax.streams`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh
import ml_collections
import optax

from diffusion_jax import models
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import schedules
from diffusion_jax.training import optimizer
from diffusion_jax.training import train_state as train_state_lib
from diffusion_jax.training import train_step as train_step_lib

PyTree = Any


def build_ops(config: ml_collections.ConfigDict, mesh: Mesh) -> ops_lib.Ops:
  """The network's operations under the config's kernel policy (`ops.from_config`)."""
  return ops_lib.from_config(config, mesh)


def build_model(config: ml_collections.ConfigDict,
                ops: ops_lib.Ops = ops_lib.XLA) -> models.UNet:
  """The U-Net of an experiment config, computing with `ops`."""
  return models.UNet(models.unet_config_from(config), ops=ops)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  """Returns the float32 diffusion coefficients (computed in float64) of `config.diffusion`."""
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps),
                                      float(d.beta_start), float(d.beta_end))
  return schedules.make_schedule(betas)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns the optimizer of `config.optim`."""
  return optimizer.make_optimizer(config.optim)


def build_train_step(config: ml_collections.ConfigDict, mesh: Mesh, ops: ops_lib.Ops,
                     donate: bool = True):
  """The run's compiled update (`train_step.make_train_step`) with the config's model,
  schedule, optimizer, key stream, classes and label dropout, computing with `ops`."""
  model = build_model(config, ops)
  return train_step_lib.make_train_step(
      train_step_lib.make_loss_fn(model, build_schedule(config), config.diffusion),
      build_optimizer(config), num_timesteps=int(config.diffusion.num_timesteps),
      ema_decay=float(config.optim.ema_decay),
      ema_debias=bool(config.optim.get("ema_debias", False)),
      base_key=streams.stream_key(config.seed, streams.TRAIN), mesh=mesh,
      learning_rate_fn=functools.partial(optimizer.current_learning_rate, config.optim),
      donate=donate, jit_options=ops.jit_options(),
      num_classes=int(config.model.get("num_classes", 0)),
      label_dropout=float(config.training.get("label_dropout", 0.0)))


def init_train_state(config: ml_collections.ConfigDict,
                     mesh: Mesh) -> train_state_lib.TrainState:
  """Returns a fresh state at step 0, replicated over `mesh`.

  The parameters are the U-Net's initialization (`models.init_params`) from
  `fold_in(key(seed), streams.INIT)`, computed on the default device of every process
  (the same values everywhere) and then replicated.
  """
  params = models.init_params(models.unet_config_from(config),
                              streams.stream_key(config.seed, streams.INIT))
  state = train_state_lib.create_train_state(params, build_optimizer(config))
  return sharding.replicate(state, mesh)


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh) -> PyTree:
  """Returns the state's shapes, dtypes and (replicated) shardings; compiles nothing."""
  params = models.param_shapes(models.unet_config_from(config))
  tx = build_optimizer(config)
  shapes = jax.eval_shape(lambda p: train_state_lib.create_train_state(p, tx), params)
  rep = sharding.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), shapes)
