"""Dropout on CPU through a compiled kernel (`csrc/dropout.cc`).

JAX draws dropout masks with threefry, which XLA:CPU computes as dozens of elementwise
passes (about 13 ns per element: some 0.4 s of a CIFAR10 train step at batch 32). The
kernel draws each element's word with Philox4x32-10 from (key, global element index) in
one vectorized pass on XLA's threads and applies the mask; the gradient applies the same
mask to the cotangent, recomputed from the key rather than stored. The masks differ from
threefry's (another generator) but, like them, depend only on the key and the element's
position in the whole (unsharded) array: a shard passes its index, and element i of
shard s is element s * size + i of the array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.backends.cpu import library
from diffusion_jax.ops import reference

_TARGET = "diffusion_jax_dropout"


def apply_mask(x: jax.Array, words: jax.Array, shard: jax.Array, keep: float) -> jax.Array:
  """x[i] / keep where element i is kept, else 0 (x float32, words uint32[2], shard
  uint32[1]: the index of x among equal-sized consecutive shards of the array)."""
  return library.ffi_call(_TARGET, [x.shape], x, words, shard, keep=np.float32(keep))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dropout(x, words, shard, keep):
  return apply_mask(x, words, shard, keep)


def _dropout_fwd(x, words, shard, keep):
  return apply_mask(x, words, shard, keep), (words, shard)


def _dropout_bwd(keep, residuals, g):
  words, shard = residuals
  return apply_mask(g.astype(jnp.float32), words, shard, keep), None, None


_dropout.defvjp(_dropout_fwd, _dropout_bwd)


def key_words(key: jax.Array) -> jax.Array:
  """The kernel's two uint32 key words, drawn from a JAX PRNG key (any implementation)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def dropout(x: jax.Array, key: jax.Array, rate: float, shard=0) -> jax.Array:
  """Zeroes each element of float32 x with probability `rate`, scales the rest by
  1 / (1 - rate). Reverse-mode differentiable in x.

  Args:
    x: float32, any shape: shard `shard` of an array cut into equal consecutive pieces
      along its leading axis (the whole array for shard 0 of 1).
    key: a JAX PRNG key.
    rate: in [0, 1).
    shard: int or int32 scalar array, the index of this piece.

  Returns:
    float32, x's shape.
  """
  if x.dtype != jnp.float32:
    raise ValueError(f"the CPU dropout kernel takes float32 x; got {x.dtype}.")
  reference.check_dropout_rate(rate)
  if rate == 0.0:
    return x
  shard = jnp.asarray(shard).astype(jnp.uint32).reshape(1)
  return _dropout(x, key_words(key), shard, float(1.0 - rate))
