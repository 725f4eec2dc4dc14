"""XLA compiler options for the project's jitted programs, chosen per platform.

On CPU, XLA hands matrix products, reductions and (by default) convolutions to the YNNPACK
library. For this U-Net its convolutions run faster through XLA's own CPU convolution
(Eigen), most of all the kernel gradients: the CIFAR10 train step at batch 8 went from
0.75x to 0.97x of the PyTorch peer on the 2-core development machine
(`benchmarks/RESULTS.md`, "compiler options"). `for_mesh` therefore keeps YNNPACK for
products and reductions only. Elsewhere (GPU, TPU) no option is set.

The options are passed per program (`jax.jit(..., compiler_options=for_mesh(mesh))`), so
they touch neither `XLA_FLAGS` nor programs that are not the project's. Setting
`DIFFUSION_JAX_XLA_DEFAULTS=1` in the environment turns them off (XLA's defaults, e.g.
to compare).
"""

from __future__ import annotations

import os
from typing import Optional

from jax.sharding import Mesh

_LIBRARY = "LIBRARY_FUSION_TYPE_"
# Operations XLA:CPU gives to YNNPACK: matrix products and reductions, not convolutions.
CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": f"{_LIBRARY}INDIVIDUAL_DOT,{_LIBRARY}REDUCE",
}
DEFAULTS_ENV = "DIFFUSION_JAX_XLA_DEFAULTS"


def for_platform(platform: str) -> Optional[dict[str, str]]:
  """The options for programs on `platform` ("cpu", "gpu", "tpu", ...); None for none."""
  if os.environ.get(DEFAULTS_ENV, "") not in ("", "0"):
    return None
  if platform == "cpu":
    return dict(CPU_OPTIONS)
  return None


def for_mesh(mesh: Mesh) -> Optional[dict[str, str]]:
  """The options for a program whose arrays live on `mesh`'s devices."""
  return for_platform(mesh.devices.flat[0].platform)
