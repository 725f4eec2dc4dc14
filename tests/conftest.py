"""Test-session setup: 8 fake CPU devices for the sharding tests, and no GPU for TF.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here at collection.
Tests that need one device use `jax.devices()[:1]` explicitly.
"""

import os
import re

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Exactly 8: a device count already in XLA_FLAGS is replaced, so every sharding test
# really spans 8 devices.
_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
