"""What a run builds from its config: model, schedule, optimizer, train state, checks.

Shared by training (`train.py`) and by the checkpoint helpers that evaluation and the
checkpoint importers use (`checkpointing.write_params_checkpoint`, `load_eval_params`).
`validate_config` runs every check that needs no data and no compilation, so bad settings
fail in seconds and before anything is written.

Keys: one base key `jax.random.key(config.seed)`, folded with a fixed stream number per
use (`INIT_STREAM` for the parameters, `TRAIN_STREAM` for the steps, `SAMPLE_STREAM` for the
sample grids), then with the step and example index where those apply.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh
import ml_collections
import optax

from diffusion_jax import losses
from diffusion_jax import models
from diffusion_jax import optimizer
from diffusion_jax import schedules
from diffusion_jax import sharding
from diffusion_jax import train_state as train_state_lib

PyTree = Any
INIT_STREAM, TRAIN_STREAM, SAMPLE_STREAM = 0, 1, 2
SAMPLERS = ("ancestral", "ddim")


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
  """Returns `fold_in(jax.random.key(config.seed), stream)`."""
  return jax.random.fold_in(jax.random.key(int(config.seed)), stream)


def build_model(config: ml_collections.ConfigDict) -> tuple[models.UNetConfig, models.UNet]:
  """Returns the U-Net config and module of an experiment config (validates it)."""
  unet_config = models.unet_config_from(config)
  return unet_config, models.UNet(unet_config)


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  """Returns the float32 diffusion coefficients (computed in float64) of `config.diffusion`."""
  d = config.diffusion
  betas = schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps),
                                      float(d.beta_start), float(d.beta_end))
  return schedules.make_schedule(betas)


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Returns the optimizer of `config.optim`."""
  return optimizer.make_optimizer(config.optim)


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """Raises ValueError naming the field and the fix for settings that cannot run.

  Checks the model (via `UNetConfig`), the diffusion and loss names, the beta schedule,
  the sampler, the step cadences and that the global batch splits over the devices.
  Needs no data and compiles nothing.
  """
  build_model(config)
  d = config.diffusion
  losses.check_loss_config(d.model_mean_type, d.model_var_type, d.loss_type)
  schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps), float(d.beta_start),
                              float(d.beta_end))
  t = config.training
  sharding.check_batch_divisible(int(t.batch_size), mesh, "training.batch_size")
  for name in ("num_train_steps", "log_every_steps", "checkpoint_every_steps",
               "snapshot_every_steps", "sample_every_steps", "num_sample_images"):
    if int(t[name]) < 1:
      raise ValueError(f"training.{name} must be >= 1, got {t[name]}.")
  if float(t.checkpoint_every_minutes) <= 0:
    raise ValueError("training.checkpoint_every_minutes must be > 0, got "
                     f"{t.checkpoint_every_minutes}.")
  if not 0.0 <= float(config.optim.ema_decay) < 1.0:
    raise ValueError(f"optim.ema_decay must be in [0, 1), got {config.optim.ema_decay}.")
  s = config.sampling
  if s.sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampling.sampler {s.sampler!r}; choose one of {SAMPLERS}.")
  if s.sampler == "ddim" and not 1 <= int(s.num_steps) <= int(d.num_timesteps):
    raise ValueError(f"sampling.num_steps={s.num_steps} must be in [1, "
                     f"diffusion.num_timesteps={d.num_timesteps}] for DDIM.")


def init_train_state(config: ml_collections.ConfigDict,
                     mesh: Mesh) -> train_state_lib.TrainState:
  """Returns a fresh state at step 0, replicated over `mesh`.

  The parameters are the U-Net's initialization (`models.init_params`) from
  `fold_in(key(seed), INIT_STREAM)`, computed on the default device of every process (the
  same values everywhere) and then replicated.
  """
  params = models.init_params(models.unet_config_from(config), stream_key(config, INIT_STREAM))
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
