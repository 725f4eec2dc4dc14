"""Kernel Inception Distance (Bińkowski et al. 2018), as its reference implementations.

KID is the squared maximum mean discrepancy between two feature sets (Inception pool3,
[N, 2048]) under the polynomial kernel k(x, y) = (x . y / d + 1)^3, estimated without
bias on subsets: for each of `num_subsets` subsets, m = min(subset_size, N_a, N_b) rows
are drawn without replacement from each set, and
  MMD^2_u = sum_{i != j} k(a_i, a_j) / (m (m - 1)) + sum_{i != j} k(b_i, b_j) / (m (m - 1))
            - 2 sum_{i, j} k(a_i, b_j) / m^2.
KID is the mean over subsets, reported with their standard deviation (100 subsets of 1000
by default, as the authors' code, torch-fidelity and clean-fid). Computed in float64 on
the host. The subsets come from `numpy.random.default_rng(seed)`: subset s draws
`choice(N_a, m, replace=False)`, then `choice(N_b, m, replace=False)`, s = 0, 1, ...; so
the result is a function of the features and the seed only.

An unbiased estimate can be negative; the KID of a set with itself is 0 up to its spread.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

NUM_SUBSETS = 100
SUBSET_SIZE = 1000


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(a b^T / d + 1)^3 for [n, d] and [m, d] -> [n, m] (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a @ b.T / a.shape[1] + 1.0) ** 3


def subset_indices(num_a: int, num_b: int, num_subsets: int, subset_size: int,
                   seed: int | Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """The rows of every subset: ([S, m] of set a, [S, m] of set b), m as above."""
  m = min(int(subset_size), int(num_a), int(num_b))
  rng = np.random.default_rng(seed)
  rows_a, rows_b = [], []
  for _ in range(int(num_subsets)):
    rows_a.append(rng.choice(num_a, m, replace=False))
    rows_b.append(rng.choice(num_b, m, replace=False))
  return np.stack(rows_a), np.stack(rows_b)


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
  """The unbiased MMD^2 of two [m, d] sets of the same size under `polynomial_kernel`."""
  m = a.shape[0]
  kaa, kbb, kab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
  within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
  return float(within - 2.0 * kab.sum() / (m * m))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, *,
                              num_subsets: int = NUM_SUBSETS,
                              subset_size: int = SUBSET_SIZE,
                              seed: int | Sequence[int] = 0) -> Dict[str, float]:
  """KID of two feature sets ([N_a, d], [N_b, d]).

  Returns:
    {"kid": mean MMD^2_u over subsets, "kid_std": their standard deviation,
     "kid_subsets": S, "kid_subset_size": m}.

  Raises:
    ValueError: for mismatched dimensions, fewer than 2 rows, or no subsets.
  """
  a, b = np.asarray(features_a), np.asarray(features_b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f"KID needs [N, d] and [M, d] features, got {a.shape} and {b.shape}.")
  if min(a.shape[0], b.shape[0], subset_size) < 2 or num_subsets < 1:
    raise ValueError(f"KID needs subsets of at least 2 rows and at least one subset; got "
                     f"{a.shape[0]} and {b.shape[0]} rows, subset_size={subset_size}, "
                     f"num_subsets={num_subsets}.")
  rows_a, rows_b = subset_indices(a.shape[0], b.shape[0], num_subsets, subset_size, seed)
  values = np.array([mmd2_unbiased(a[ra], b[rb]) for ra, rb in zip(rows_a, rows_b)])
  return {"kid": float(values.mean()), "kid_std": float(values.std()),
          "kid_subsets": int(num_subsets), "kid_subset_size": int(rows_a.shape[1])}
