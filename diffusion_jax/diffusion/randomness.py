"""Per-example randomness of the samplers and the bound: one PRNG key per example.

A sample is a function of its own key only, whatever the batch it sits in and however
that batch is sharded: the noise of example b at timestep t is drawn from
`fold_in(keys[b], t)`, its initial x_T from `fold_in(keys[b], T)`. Streams that are not
timesteps use indices above T (`streams.COMPLETION`, `streams.ENCODER` offsets).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def as_key_array(keys: jax.Array, batch_size: int | None = None) -> jax.Array:
  """Checks per-example keys and returns them as a typed key array of shape [B].

  Args:
    keys: [B] typed keys (`jax.random.split(jax.random.key(0), B)`), or legacy uint32
      keys of shape [B, 2] (`jax.random.PRNGKey` style), which are wrapped.
    batch_size: if given, the required B.

  Raises:
    ValueError: for keys of the wrong kind or number.
  """
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    if keys.dtype == jnp.uint32 and keys.ndim == 2:
      keys = jax.random.wrap_key_data(keys)
    else:
      raise ValueError(
          f"Expected one PRNG key per example (shape [B] typed keys from "
          f"jax.random.split(jax.random.key(seed), B)), got dtype {keys.dtype} and "
          f"shape {keys.shape}.")
  if keys.ndim != 1:
    raise ValueError(f"Expected keys of shape [B] (one per example), got {keys.shape}.")
  if batch_size is not None and keys.shape[0] != batch_size:
    raise ValueError(f"Got {keys.shape[0]} keys for a batch of {batch_size} examples; "
                     "pass exactly one key per example.")
  return keys


def per_example_normal(keys: jax.Array, index, shape: Sequence[int], dtype) -> jax.Array:
  """Standard normal noise of each example from `fold_in(keys[b], index)`.

  Args:
    keys: [B] typed PRNG keys.
    index: int or int scalar array (a timestep, or T for x_T).
    shape: the per-example shape, e.g. (H, W, C).
    dtype: float dtype of the noise.

  Returns:
    [B, *shape] noise.
  """
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  # Drawn flat and reshaped: the same numbers as normal(key, shape) (the counters are
  # the row-major index either way), but several times faster to compile on CPU.
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, index), (size,), dtype)
  return jax.vmap(draw)(keys).reshape((keys.shape[0],) + shape)


def derived_keys(keys: jax.Array, stream: int, count: int) -> jax.Array:
  """Keys [B, count]: fold_in(fold_in(keys[b], stream), j) for j < count."""
  def per_example(k):
    base = jax.random.fold_in(k, stream)
    return jax.vmap(lambda j: jax.random.fold_in(base, j))(jnp.arange(count))
  return jax.vmap(per_example)(keys)
