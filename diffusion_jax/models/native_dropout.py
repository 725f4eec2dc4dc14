"""Dropout on CPU through this project's compiled kernel (`native/dropout.cc`).

JAX draws dropout masks with threefry, which XLA:CPU computes as dozens of elementwise
passes (about 13 ns per element here: some 0.4 s of a CIFAR10 train step at batch 32).
The kernel draws each element's word with Philox4x32-10 from (key, element index) in one
vectorized pass on XLA's threads and applies the mask; the gradient applies the same
mask to the cotangent, recomputed from the key rather than stored. Used where the oneDNN
convolutions are (`conv.onednn_enabled`: CPU, float32). The masks differ from threefry's
(another generator) but, like them, depend only on the key and the element's position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import onednn

_TARGET = "diffusion_jax_dropout"


def apply_mask(x: jax.Array, words: jax.Array, keep: float) -> jax.Array:
  """x[i] / keep where element i is kept, else 0 (x float32, words uint32[2])."""
  return onednn.ffi_call(_TARGET, [x.shape], x, words, keep=np.float32(keep))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dropout(x, words, keep):
  return apply_mask(x, words, keep)


def _dropout_fwd(x, words, keep):
  return apply_mask(x, words, keep), words


def _dropout_bwd(keep, words, g):
  return apply_mask(g.astype(jnp.float32), words, keep), None


_dropout.defvjp(_dropout_fwd, _dropout_bwd)


def key_words(key: jax.Array) -> jax.Array:
  """The kernel's two uint32 key words, drawn from a JAX PRNG key (any implementation)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Zeroes each element of float32 x with probability `rate`, scales the rest by
  1 / (1 - rate). Reverse-mode differentiable in x.

  Args:
    x: float32, any shape.
    key: a JAX PRNG key.
    rate: in [0, 1).

  Returns:
    float32, x's shape.
  """
  if x.dtype != jnp.float32:
    raise ValueError(f"native_dropout.dropout takes float32 x; got {x.dtype}.")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"native_dropout.dropout: rate must be in [0, 1), got {rate}.")
  return _dropout(x, key_words(key), float(1.0 - rate))
