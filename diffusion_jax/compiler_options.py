"""XLA compiler options for the project's jitted programs, chosen per platform.

On CPU, XLA hands matrix products, reductions and (by default) convolutions to the YNNPACK
library. For this U-Net its convolutions run faster through XLA's own CPU convolution
(Eigen), above all the kernel gradients, whose whole-map convolutions YNNPACK runs slowly
(`python -m benchmarks.conv_breakdown`; `benchmarks/RESULTS.md`). On CPU, `for_mesh`
therefore keeps YNNPACK for products and reductions only. Elsewhere (GPU, TPU) it sets
nothing.

The options are passed per program (`jax.jit(..., compiler_options=for_mesh(mesh))`), so
they touch neither `XLA_FLAGS` nor programs that are not the project's. An XLA that no
longer knows the option gets none (with a warning) rather than failing to compile.
Setting `DIFFUSION_JAX_XLA_DEFAULTS=1` in the environment turns them off (XLA's defaults,
e.g. to compare).
"""

from __future__ import annotations

import functools
import os
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

_LIBRARY = "LIBRARY_FUSION_TYPE_"
# Operations XLA:CPU gives to YNNPACK: matrix products and reductions, not convolutions.
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": f"{_LIBRARY}INDIVIDUAL_DOT,{_LIBRARY}REDUCE",
}
DEFAULTS_ENV = "DIFFUSION_JAX_XLA_DEFAULTS"


@functools.lru_cache(maxsize=None)
def _cpu_options_accepted() -> bool:
  """Whether this jaxlib's XLA:CPU accepts `CPU_OPTIONS` (compiles a tiny program once)."""
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    probe = jax.jit(lambda x: x + 1, compiler_options=dict(CPU_OPTIONS))
    probe.lower(jax.ShapeDtypeStruct((2,), jnp.float32, sharding=cpu)).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("This XLA rejects the CPU compiler options %s (%s); using its "
                    "defaults.", CPU_OPTIONS, str(e).splitlines()[0][:200])
    return False


def for_platform(platform: str) -> Optional[dict[str, str]]:
  """The options for programs on `platform` ("cpu", "gpu", "tpu", ...); None for none."""
  if os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
    return None
  if platform == "cpu" and _cpu_options_accepted():
    return dict(CPU_OPTIONS)
  return None


def for_default_backend() -> Optional[dict[str, str]]:
  """The options for a program on JAX's default backend (no mesh given)."""
  return for_platform(jax.default_backend())


def for_mesh(mesh: Mesh) -> Optional[dict[str, str]]:
  """The options for a program whose arrays live on `mesh`'s devices."""
  return for_platform(mesh.devices.flat[0].platform)
