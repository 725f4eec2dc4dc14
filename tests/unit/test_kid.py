"""KID vs an independent float64 NumPy implementation written from the paper's U-statistic
(Bińkowski et al. 2018, Eq. 1 with the cubic polynomial kernel), element by element."""

import numpy as np
import pytest

from diffusion_jax.evaluation import kid


def reference_mmd2(x, y):
  """Unbiased MMD^2 with explicit pair loops over i != j (float64)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, d = x.shape
  k = lambda u, v: (float(np.dot(u, v)) / d + 1.0) ** 3
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
  return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def _features(n, d, shift, seed):
  return (np.random.default_rng(seed).standard_normal((n, d)) + shift).astype(np.float32)


def test_kid_matches_reference_on_the_same_subsets():
  a, b = _features(40, 16, 0.0, 0), _features(30, 16, 0.3, 1)
  out = kid.kernel_inception_distance(a, b, num_subsets=5, subset_size=12, seed=[0, 15])
  rows_a, rows_b = kid.subset_indices(40, 30, 5, 12, [0, 15])
  assert rows_a.shape == rows_b.shape == (5, 12)
  assert all(len(set(r)) == 12 for r in rows_a)  # without replacement
  want = [reference_mmd2(a[ra], b[rb]) for ra, rb in zip(rows_a, rows_b)]
  assert out["kid"] == pytest.approx(np.mean(want), rel=1e-6)
  assert out["kid_std"] == pytest.approx(np.std(want), rel=1e-6)
  assert out["kid_subsets"] == 5 and out["kid_subset_size"] == 12


def test_kid_on_whole_sets_needs_no_subsets():
  """m = N: every subset is a permutation of the set, and MMD^2_u is permutation-free."""
  a, b = _features(20, 8, 0.0, 2), _features(20, 8, 0.5, 3)
  out = kid.kernel_inception_distance(a, b, num_subsets=3, subset_size=1000)
  assert out["kid_subset_size"] == 20
  assert out["kid"] == pytest.approx(reference_mmd2(a, b), rel=1e-6)
  assert out["kid_std"] < 1e-9 * abs(out["kid"])
  assert out["kid"] > 0.05  # a shifted set is far


def test_kid_of_a_set_with_itself_is_zero_within_its_spread():
  """Subsets drawn independently from one set of n share elements, so the expectation is
  not exactly 0 but (2 / n) (mean off-diagonal kernel - mean diagonal kernel): small
  against the spread for n >> m, and checked exactly here."""
  n, subsets = 2000, 50
  a = _features(n, 32, 0.0, 4)
  same = kid.kernel_inception_distance(a, a, num_subsets=subsets, subset_size=100)
  other = kid.kernel_inception_distance(a, _features(n, 32, 0.4, 5), num_subsets=subsets,
                                        subset_size=100)
  assert abs(same["kid"]) < same["kid_std"]
  assert other["kid"] > 10 * same["kid_std"]
  full = (a.astype(np.float64) @ a.T.astype(np.float64) / 32 + 1) ** 3
  diag = np.mean(np.diag(full))
  off = (full.sum() - np.trace(full)) / (n * (n - 1))
  expected = 2.0 / n * (off - diag)
  assert abs(same["kid"] - expected) < 3 * same["kid_std"] / np.sqrt(subsets)


def test_kid_errors():
  with pytest.raises(ValueError, match=r"\[N, d\]"):
    kid.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match="at least 2 rows"):
    kid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
