"""The official DDPM U-Net in Flax, its configuration and parameter initialization."""

from diffusion_jax.models.build import count_params
from diffusion_jax.models.build import init_params
from diffusion_jax.models.build import param_paths
from diffusion_jax.models.build import param_shapes
from diffusion_jax.models.build import unet_config_from
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.unet import UNetConfig

__all__ = ["UNet", "UNetConfig", "count_params", "init_params", "param_paths", "param_shapes",
           "unet_config_from"]
