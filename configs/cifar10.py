"""CIFAR10 32x32, the paper's setup (35.7M-parameter U-Net, L_simple, eps-prediction).

The paper's Table 2 rows are overrides of this file, e.g.
  --config.diffusion.model_mean_type=mean --config.diffusion.loss_type=kl
  --config.diffusion.model_var_type=learned --config.diffusion.loss_type=kl
"""

from diffusion_jax import config_base


def get_config(variant: str = ""):
  config = config_base.get_base_config()
  return config_base.finalize(config, variant)
