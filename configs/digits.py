"""The CPU quickstart: scikit-learn's bundled 8x8 digits (no download), upsampled to 16x16.

Trains a small U-Net in a few minutes on a 2-core CPU and writes a sample grid,
TensorBoard logs and a checkpoint under the workdir.
"""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  config.data.dataset = "digits"
  config.data.image_size = 16
  config.data.channels = 1
  config.data.random_flip = False
  config.data.shuffle_buffer_size = 1_797
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_groups = 8
  config.model.dropout = 0.0
  config.diffusion.num_timesteps = 200
  config.training.batch_size = 64
  config.training.num_train_steps = 1_500
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.training.snapshot_every_steps = 1_500
  config.training.sample_every_steps = 1_500
  config.training.num_sample_images = 64
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.ema_decay = 0.995
  return config_base.finalize(config, variant)
