"""The operations of the U-Net that a backend may replace, as one small interface.

The network (`diffusion_jax.models`) calls its convolutions, GroupNorm(+swish) and dropout
through an `Ops` value passed to it as a module attribute (`UNet(config, ops=...)`). The
pure-JAX versions (`ops.reference`) are the reference and what runs on TPU and GPU; the CPU
backend (`diffusion_jax.backends.cpu`) supplies compiled kernels with the same contract.
Which one a program uses is decided once, from the config and the mesh (`ops.policy`).

Contract of each operation (float32 or bfloat16 inputs; float64 for the references):
  conv3x3(x [B, H, W, Cin], kernel [3, 3, Cin, Cout], stride, bias [Cout] | None)
      -> [B, ceil(H / s), ceil(W / s), Cout], TF "SAME" padding, accumulated in float32
         (float64 for float64 inputs).
  conv1x1(x [B, H, W, Cin], kernel [Cin, Cout], bias [Cout]) -> [B, H, W, Cout] as above.
  group_norm(x [B, H, W, C], scale [C], bias [C], *, num_groups, epsilon, swish,
             out_dtype) -> [B, H, W, C] in out_dtype (default x's), statistics in float32.
  dropout(x, key, rate) -> x's shape and dtype; zeroes each element with probability
      `rate` and scales the rest by 1 / (1 - rate); the mask is a function of the key and
      the element's position in the global (unsharded) array only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax

Conv3x3 = Callable[[jax.Array, jax.Array, int, Optional[jax.Array]], jax.Array]
Conv1x1 = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
GroupNorm = Callable[..., jax.Array]
Dropout = Callable[[jax.Array, jax.Array, float], jax.Array]


@dataclasses.dataclass(frozen=True)
class Ops:
  """One backend's versions of the replaceable operations (see the module docstring).

  Attributes:
    name: "xla" (the pure-JAX reference) or "native" (the CPU backend's kernels).
    conv3x3, conv1x1, group_norm, dropout: the operations.
    compiler_options: XLA compiler options for every program that uses these operations
      (as (name, value) pairs, so that the value stays hashable); empty for none.
    description: one line for the logs (what runs where).
  """
  name: str
  conv3x3: Conv3x3
  conv1x1: Conv1x1
  group_norm: GroupNorm
  dropout: Dropout
  compiler_options: tuple[tuple[str, str], ...] = ()
  description: str = ""

  def jit_options(self) -> Optional[dict[str, Any]]:
    """The `compiler_options` argument of `jax.jit` for programs using these ops."""
    return dict(self.compiler_options) or None
