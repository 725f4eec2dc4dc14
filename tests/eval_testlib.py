"""Shared pieces of the evaluation-job tests: a tiny config, a workdir with a checkpoint."""

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import numpy as np

from diffusion_jax.training import checkpointing
from diffusion_jax import config_base
from diffusion_jax import models
from diffusion_jax.training import run_setup
from diffusion_jax import sharding
from diffusion_jax.training import train_state

STEP = 3


def tiny_eval_config():
  """A ~50k-parameter U-Net on 8x8 grey digits, T = 20; 12 samples in shards of 5."""
  config = config_base.shrink(config_base.get_base_config())
  config.data.dataset = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.random_flip = False
  config.data.eval_split = "train[:24]"
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 20
  config.sampling.num_samples = 12
  config.sampling.shard_size = 5  # shards of 5, 5, 2; batches of 8 (padded)
  config.sampling.batch_size = 8
  config.eval.bpd_batch_size = 8
  config.eval.bpd_num_images = 12  # batches of 8 + 4 (masked padding)
  return config


@contextlib.contextmanager
def persistent_compilation_cache(cache_dir):
  """The persistent compilation cache, on inside the block: programs identical to ones
  compiled before (a resumed job's) come from the cache instead of being recompiled."""
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax_cache.set_cache_dir(cache_dir)
  jax_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax_cache.reset_cache()


def make_workdir(path, config=None):
  """Writes one checkpoint (step STEP) whose EMA differs from the raw parameters.

  Returns:
    (path, the EMA parameters as NumPy arrays).
  """
  config = config or tiny_eval_config()
  params = jax.device_get(models.init_params(models.unet_config_from(config),
                                             jax.random.key(0)))
  rng = np.random.default_rng(1)
  ema = jax.tree_util.tree_map(
      lambda p: (p + 0.05 * rng.normal(size=p.shape)).astype(np.float32), params)
  state = train_state.create_train_state(params, run_setup.build_optimizer(config),
                                         ema_params=ema, step=STEP)
  state = sharding.replicate(state, sharding.make_mesh())
  ckpt = checkpointing.Checkpointer(path, config, async_save=False)
  ckpt.save(STEP, state)
  ckpt.close()
  return path, ema
