"""XLA:CPU compiler options for the programs of the CPU backend.

On CPU, XLA hands matrix products, reductions and (by default) convolutions to the YNNPACK
library. For the networks here its convolutions run faster through XLA's own CPU
convolution (Eigen), above all the kernel gradients, whose whole-map convolutions YNNPACK
runs slowly (`python -m benchmarks.conv_breakdown`), and the Inception network of the FID
features too. `options()` therefore keeps YNNPACK for products and reductions only.

The options are passed per program (`jax.jit(..., compiler_options=...)`, through
`Ops.jit_options()`), so they touch neither `XLA_FLAGS` nor programs that are not the
project's. An XLA that no longer knows the option gets none (with a warning) rather than
failing to compile.
"""

from __future__ import annotations

import functools

from absl import logging
import jax
import jax.numpy as jnp

_LIBRARY = "LIBRARY_FUSION_TYPE_"
# Operations XLA:CPU gives to YNNPACK: matrix products and reductions, not convolutions.
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": f"{_LIBRARY}INDIVIDUAL_DOT,{_LIBRARY}REDUCE",
}


@functools.lru_cache(maxsize=None)
def accepted() -> bool:
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


def options() -> dict[str, str]:
  """The options for the CPU backend's programs ({} where this XLA rejects them)."""
  return dict(CPU_OPTIONS) if accepted() else {}
