"""Which example, and whether it is flipped, at every position of the training stream.

The training data order is a pure function of `(seed, position)`, where the global
position of row `r` of the global batch at step `s` is `p = s * global_batch_size + r`:

  epoch  = p // num_examples
  index  = permutation(seed, epoch)[p % num_examples]
  flip   = bit(seed, p)

so a run resumed at step N computes exactly the batches that an uninterrupted run sees,
without reading the N batches before it, and a process computes the rows it owns without
knowing the others'. Every epoch visits every example exactly once (a perfect shuffle, so
no shuffle buffer is involved), and batches run across epoch boundaries (nothing is
dropped: `repeat` before `batch`).

The permutation is a keyed Feistel network on the smallest even-bit domain 2^(2h) that
holds `num_examples`, restricted to [0, num_examples) by cycle walking: each position is
computed on its own in O(1) (no permutation of all N examples is materialized, so LSUN's
3M images cost the same as MNIST's 60k). All arithmetic is on uint64 with a fixed
SplitMix64 mixer, written here, so the order does not depend on the NumPy, TensorFlow or
JAX version.
"""

from __future__ import annotations

import numpy as np

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_NUM_ROUNDS = 10
# Odd constants that separate the uses of the seed (order keys vs. flips).
_ORDER_DOMAIN = 0x9E3779B97F4A7C15
_FLIP_DOMAIN = 0xD1B54A32D192ED03


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finalizer: a bijective avalanche mix of uint64 values (wrapping)."""
  x = x ^ (x >> _U64(30))
  x = x * _U64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> _U64(27))
  x = x * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def _as_u64(values) -> np.ndarray:
  """Integers as a 1-D uint64 array (two's complement wrap for negative int64 values)."""
  arr = np.atleast_1d(np.asarray(values))
  if arr.dtype == np.uint64:
    return arr
  return arr.astype(np.int64).astype(np.uint64)


def _seed_u64(seed: int, domain: int) -> np.ndarray:
  return _mix64(_as_u64([(int(seed) ^ domain) & _MASK64]))


def _feistel(x: np.ndarray, keys: np.ndarray, half_bits: int) -> np.ndarray:
  """A keyed bijection of [0, 2^(2*half_bits)); `keys` is [rounds, len(x)]."""
  mask = _U64((1 << half_bits) - 1)
  shift = _U64(half_bits)
  left, right = x >> shift, x & mask
  for k in keys:
    left, right = right, left ^ (_mix64(right ^ k) & mask)
  return (left << shift) | right


def permuted_indices(seed: int, epochs, offsets, num_examples: int) -> np.ndarray:
  """Returns `permutation(seed, epoch)[offset]` elementwise.

  Args:
    seed: the data seed (any Python int).
    epochs: int array [n], the epoch of each element.
    offsets: int array [n], each in [0, num_examples).
    num_examples: the size of the permuted set (>= 1).

  Returns:
    int64 array [n] of example indices; for a fixed (seed, epoch) the map from offset
    to index is a bijection of [0, num_examples).
  """
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}.")
  offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
  epochs = np.broadcast_to(np.asarray(epochs, dtype=np.int64).reshape(-1), offsets.shape)
  if offsets.size and (offsets.min() < 0 or offsets.max() >= num_examples):
    raise ValueError(f"offsets must lie in [0, {num_examples}).")
  bits = max(2, int(num_examples - 1).bit_length())
  half_bits = (bits + 1) // 2
  seed_key = _seed_u64(seed, _ORDER_DOMAIN)
  epoch_keys = _mix64(seed_key ^ _mix64(_as_u64(epochs)))  # [n]
  keys = np.stack([_mix64(epoch_keys ^ _U64(r + 1)) for r in range(_NUM_ROUNDS)])
  n = _U64(num_examples)
  out = _feistel(offsets.astype(np.uint64), keys, half_bits)
  todo = out >= n
  while np.any(todo):  # Cycle walking: expected < 4 passes since 2^(2h) < 4 N.
    out[todo] = _feistel(out[todo], keys[:, todo], half_bits)
    todo = out >= n
  return out.astype(np.int64)


def flip_bits(seed: int, positions) -> np.ndarray:
  """Returns bool [n]: whether the example at each global position is flipped (p = 1/2)."""
  positions = _as_u64(np.asarray(positions, dtype=np.int64).reshape(-1))
  bits = _mix64(_seed_u64(seed, _FLIP_DOMAIN) ^ _mix64(positions)) >> _U64(63)
  return bits.astype(bool)


def train_positions(steps, global_batch_size: int, rows) -> np.ndarray:
  """Global stream positions [..., b] of the given rows of the batches at `steps` [...]."""
  rows = np.asarray(rows, dtype=np.int64).reshape(-1)
  steps = np.asarray(steps, dtype=np.int64)
  return steps[..., None] * np.int64(global_batch_size) + rows


def train_plan(
    *, seed: int, steps, global_batch_size: int, num_examples: int, rows
) -> tuple[np.ndarray, np.ndarray]:
  """Example indices and flip bits of some rows of the global training batches at `steps`.

  Args:
    seed: the data seed.
    steps: int or int array [...], the training steps (0-based) whose batches are wanted.
    global_batch_size: rows per global batch (over all processes).
    num_examples: the size of the training set.
    rows: int array [b], the rows of the global batch wanted (e.g. this process's).

  Returns:
    (indices int64 [..., b], flips bool [..., b]).
  """
  positions = train_positions(steps, global_batch_size, rows)
  epochs, offsets = np.divmod(positions, np.int64(num_examples))
  indices = permuted_indices(seed, epochs, offsets, num_examples).reshape(positions.shape)
  return indices, flip_bits(seed, positions).reshape(positions.shape)
