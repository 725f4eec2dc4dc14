"""Improved precision and recall (Kynkäänniemi et al. 2019) of two feature sets, in JAX.

Each set's manifold is the union of balls around its samples, the radius of a ball being
the distance to the sample's k-th nearest neighbour in its own set (k = 3 in the paper,
the sample itself excluded). Precision = fraction of generated samples inside the real
manifold; recall = fraction of real samples inside the generated manifold. Squared
Euclidean distances are compared with squared radii (the same decisions as distances).

Pairwise distances are computed in row chunks by one compiled program (float32 with
HIGHEST matmul precision): ||a||^2 - 2 a.b + ||b||^2, clipped at 0.
"""

from __future__ import annotations

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np


def _sq_distances(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """[n, D], [m, D] -> [n, m] squared Euclidean distances."""
  aa = jnp.sum(a * a, axis=1)[:, None]
  bb = jnp.sum(b * b, axis=1)[None, :]
  ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(aa - 2.0 * ab + bb, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour(rows: jnp.ndarray, ref: jnp.ndarray, k: int) -> jnp.ndarray:
  # The (k+1)-th smallest distance: the row itself (distance 0) comes first.
  d = _sq_distances(rows, ref)  # [n, m]
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _inside(rows: jnp.ndarray, ref: jnp.ndarray, ref_radii: jnp.ndarray) -> jnp.ndarray:
  d = _sq_distances(rows, ref)  # [n, m]
  return jnp.any(d <= ref_radii[None, :], axis=1)


def _chunked(fn, rows: np.ndarray, chunk: int, *args) -> np.ndarray:
  out = []
  for i in range(0, rows.shape[0], chunk):
    block = rows[i:i + chunk]
    count = block.shape[0]
    if count < chunk:  # pad to one compiled shape
      block = np.concatenate([block, np.zeros((chunk - count,) + block.shape[1:],
                                              block.dtype)])
    out.append(np.asarray(fn(block, *args))[:count])
  return np.concatenate(out)


def knn_radii(features: np.ndarray, k: int = 3, chunk_size: int = 1024) -> np.ndarray:
  """Squared distance of every sample to its k-th nearest neighbour (itself excluded).

  Args:
    features: [N, D] with N > k.
    k: neighbourhood size.
    chunk_size: rows per compiled call.

  Returns:
    [N] float32 squared radii.
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] <= k:
    raise ValueError(f"knn_radii needs [N > k={k}, D] features, got {features.shape}.")
  chunk = min(chunk_size, features.shape[0])
  return _chunked(lambda r, ref: _kth_neighbour(r, ref, k), features, chunk,
                  jnp.asarray(features))


def manifold_coverage(query: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray,
                      chunk_size: int = 1024) -> float:
  """Fraction of `query` rows within the squared radius of at least one `ref` row."""
  query = np.asarray(query, np.float32)
  chunk = min(chunk_size, query.shape[0])
  inside = _chunked(_inside, query, chunk, jnp.asarray(ref, jnp.float32),
                    jnp.asarray(ref_radii, jnp.float32))
  return float(np.mean(inside))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     chunk_size: int = 1024) -> Dict[str, float]:
  """Returns {'precision', 'recall'} of `fake` against `real` ([N, D] and [M, D]).

  Raises:
    ValueError: if the feature dimensions differ or a set has at most k samples.
  """
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall needs [N, D] and [M, D] features, got "
                     f"{real.shape} and {fake.shape}.")
  real_radii = knn_radii(real, k, chunk_size)
  fake_radii = knn_radii(fake, k, chunk_size)
  return {"precision": manifold_coverage(fake, real, real_radii, chunk_size),
          "recall": manifold_coverage(real, fake, fake_radii, chunk_size)}
