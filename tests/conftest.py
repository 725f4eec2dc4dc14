"""Test-session setup: 8 fake CPU devices for the sharding tests, and no GPU for TF.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here at collection.
Tests that need one device use `jax.devices()[:1]` explicitly.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
