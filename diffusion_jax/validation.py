"""The one validation pass of a job's config: every check that needs no data and no
compilation, so that bad settings fail in seconds, before anything is written.

`validate_config` is called once at the start of training and of every evaluation job.
Each error names the field and the fix.
"""

from __future__ import annotations

from jax.sharding import Mesh
import ml_collections

from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import schedules
from diffusion_jax.ops import policy


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh, *,
                    training: bool = True) -> None:
  """Raises ValueError naming the field and the fix for settings that cannot run.

  Checks the model (via `UNetConfig`), the kernel policy, the diffusion and loss names,
  the beta schedule, the sampler, the step cadences, the EMA decay and, for training,
  that the global training batch splits over the devices and processes (evaluation jobs
  check their own batch sizes).
  """
  models.unet_config_from(config)
  policy.check_policy(str(config.model.get("kernels", "auto")))
  d = config.diffusion
  losses.check_loss_config(d.model_mean_type, d.model_var_type, d.loss_type)
  schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps), float(d.beta_start),
                              float(d.beta_end))
  t = config.training
  if training:
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
  sampling.check_sampler(config)
