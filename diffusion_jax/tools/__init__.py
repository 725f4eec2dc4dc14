"""Command-line tools (`python -m diffusion_jax.tools.<name>`): checkpoint import/export and
evaluation helpers."""
