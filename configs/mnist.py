"""MNIST 28x28, one channel (seed 004's exercise): eps- or v-prediction.

  --config.diffusion.model_mean_type=v   for v-prediction.
"""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  config.data.dataset = "mnist"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.random_flip = False
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2)
  config.model.attn_resolutions = (14,)
  config.model.dropout = 0.1
  config.training.batch_size = 128
  config.training.num_train_steps = 50_000
  config.training.sample_every_steps = 5_000
  config.training.snapshot_every_steps = 10_000
  config.optim.warmup_steps = 1_000
  return config_base.finalize(config, variant)
