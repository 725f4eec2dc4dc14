"""Backends of the replaceable operations (`diffusion_jax.ops`): `cpu`, the compiled CPU
kernels. TPU and GPU run the pure-JAX reference and need no backend of their own."""
