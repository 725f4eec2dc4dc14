"""Shared helpers of the training-system tests: tiny configs and a compilation cache.

The persistent compilation cache lets the tests and the subprocesses they start reuse
the XLA programs compiled for the same tiny configurations (identical programs compile
once per test session), which keeps the training tests within their time budget.
"""

import os

from absl import flags
from jax.experimental.compilation_cache import compilation_cache
import jax

from ml_collections import config_flags

from diffusion_jax import config_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def enable_compilation_cache(cache_dir):
  """Turns the persistent cache on in this process; returns env vars for children."""
  os.makedirs(cache_dir, exist_ok=True)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  compilation_cache.set_cache_dir(str(cache_dir))
  compilation_cache.reset_cache()
  return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def disable_compilation_cache():
  """Turns the persistent cache off again (restoring the session's default)."""
  jax.config.update("jax_compilation_cache_dir", None)
  compilation_cache.reset_cache()


def tiny_config(dropout=0.0):
  """A U-Net of ~0.2M parameters on 8x8x1 images, T = 50, global batch 16."""
  config = config_base.shrink(config_base.get_base_config())
  config.data.image_size = 8
  config.data.channels = 1
  config.model.ch = 16
  config.model.ch_mult = (1, 2)
  config.model.attn_resolutions = (4,)
  config.model.num_groups = 4
  config.model.dropout = dropout
  config.diffusion.num_timesteps = 50
  config.training.batch_size = 16
  config.optim.warmup_steps = 1
  config.optim.learning_rate = 1e-3
  config.optim.ema_decay = 0.9
  return config


def load_config(spec, *overrides):
  """Parses `configs/<file>.py[:variant]` and `--config.x=y` overrides as main.py does."""
  path, _, variant = spec.partition(":")
  path = os.path.join(REPO, path)
  argv = ["prog", f"--config={path}:{variant}" if variant else f"--config={path}",
          *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def digits_smoke(*overrides):
  """`configs/digits.py:smoke`, the configuration of most training tests (8x8x1)."""
  return load_config("configs/digits.py:smoke", *overrides)
