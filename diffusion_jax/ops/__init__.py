"""The replaceable operations of the U-Net (convolutions, GroupNorm, dropout): the `Ops`
interface, its pure-JAX reference `XLA`, and the kernel policy that picks a backend."""

from diffusion_jax.ops.interface import Ops
from diffusion_jax.ops.policy import POLICIES
from diffusion_jax.ops.policy import XLA
from diffusion_jax.ops.policy import from_config
from diffusion_jax.ops.policy import resolve

__all__ = ["Ops", "POLICIES", "XLA", "from_config", "resolve"]
