"""Fréchet Inception Distance: feature statistics, their .npz files, the distance in float64.

FID(a, b) = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over the pool3 features of
the two image sets, with mu the mean and S the unbiased covariance (`np.cov`, ddof=1).
The distance follows TTUR's numerics: `scipy.linalg.sqrtm(S_a @ S_b)` in float64; if the
result is not finite, both covariances get `eps * I` added and the root is recomputed; an
imaginary part (round-off on near-singular products) is dropped when the diagonal's is
below 1e-3 and is an error otherwise.

Statistics files are .npz with `mu` [2048] and `sigma` [2048, 2048] (the layout of TTUR's and
pytorch-fid's published statistics, which this module reads too), plus optional string
metadata (`origin`, `num_images`) that other readers ignore.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Tuple
import warnings

import numpy as np
import scipy.linalg

Stats = Tuple[np.ndarray, np.ndarray]


def feature_statistics(features: np.ndarray, chunk_size: int = 4096) -> Stats:
  """Returns (mu [D], sigma [D, D]) in float64, as `np.mean` and `np.cov(rowvar=False)`.

  The covariance is accumulated over row chunks of the centred features, so a float32
  [50000, 2048] matrix never needs a float64 copy.

  Args:
    features: [N, D] with N >= 2.
    chunk_size: rows per float64 chunk.
  """
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"feature_statistics needs [N >= 2, D] features, got shape "
                     f"{features.shape}.")
  n, d = features.shape
  mu = np.zeros(d, np.float64)
  for i in range(0, n, chunk_size):
    mu += features[i:i + chunk_size].astype(np.float64).sum(axis=0)
  mu /= n
  sigma = np.zeros((d, d), np.float64)
  for i in range(0, n, chunk_size):
    centred = features[i:i + chunk_size].astype(np.float64) - mu  # [chunk, D]
    sigma += centred.T @ centred
  sigma /= n - 1
  return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.
    eps: diagonal offset used when the matrix square root is not finite (as TTUR).
    method: "sqrtm" (TTUR's numerics, the default) or "eigh": Tr((S1 S2)^1/2) as the sum
      of the square roots of the eigenvalues of the symmetric S1^1/2 S2 S1^1/2 (two
      symmetric eigendecompositions; the same value for valid covariances, several
      times faster than the Schur-based sqrtm when the product is singular, i.e. with
      fewer images than feature dimensions).

  Raises:
    ValueError: for mismatched shapes, non-finite inputs, or a square root with a large
      imaginary part.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"Statistics shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}.")
  for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(value)):
      raise ValueError(f"{name} has non-finite entries; recompute the statistics.")
  diff = mu1 - mu2
  if method == "eigh":
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
  if method != "sqrtm":
    raise ValueError(f"Unknown method {method!r}; use 'sqrtm' or 'eigh'.")
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is singular; adding {eps} to the "
                  "diagonal of both covariances.")
    offset = np.eye(d) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: the matrix square root has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not "
                       "valid (too few images?).")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two [N, D] feature sets."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray,
                    metadata: Optional[Mapping[str, object]] = None) -> None:
  """Writes `mu`, `sigma` (float64) and string metadata to a .npz, atomically.

  Args:
    path: output file; its directory is created.
    mu: [D] mean.
    sigma: [D, D] covariance.
    metadata: e.g. {'origin': 'mnist.npz:x_train', 'num_images': 60000}; stored as
      string arrays `meta/<key>` (read back by `load_statistics(..., with_metadata=True)`).
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"Expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.")
  arrays = {"mu": mu, "sigma": sigma}
  for key, value in (metadata or {}).items():
    arrays[f"meta/{key}"] = np.array(str(value))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_statistics(path: str, with_metadata: bool = False):
  """Reads (mu, sigma) float64 from a .npz with keys `mu` and `sigma`.

  Also reads TTUR's and pytorch-fid's published statistics files.

  Returns:
    (mu, sigma), or (mu, sigma, metadata dict) when `with_metadata`.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file {path!r} not found; make one with "
                            "`python -m diffusion_jax.tools.fid_stats`.")
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{path} has keys {sorted(data.files)}; FID statistics need 'mu' "
                       "and 'sigma'.")
    mu = data["mu"].astype(np.float64)
    sigma = data["sigma"].astype(np.float64)
    meta: Dict[str, str] = {k[len("meta/"):]: str(data[k]) for k in data.files
                            if k.startswith("meta/")}
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D].")
  return (mu, sigma, meta) if with_metadata else (mu, sigma)
