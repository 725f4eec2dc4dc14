"""LSUN church 256x256: ch 128, ch_mult (1,1,2,2,4,4), attention at 16x16, 114M parameters."""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  config.data.dataset = "lsun/church_outdoor"
  config.data.image_size = 256
  config.data.eval_split = "validation"
  config.data.random_flip = True
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)
  config.model.dropout = 0.0
  config.training.batch_size = 64
  config.optim.learning_rate = 2e-5
  config.training.num_train_steps = 1_200_000  # The paper's 1.2M steps (Appendix B).
  config.training.snapshot_every_steps = 100_000
  config.training.sample_every_steps = 20_000
  config.training.num_sample_images = 16
  config.sampling.batch_size = 64
  return config_base.finalize(config, variant)
