"""FID, Inception Score and precision/recall against closed forms and float64 references."""

import json

import numpy as np
import pytest
import scipy.special

from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_score
from diffusion_jax.evaluation import precision_recall
from diffusion_jax.tools import fid as fid_tool


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or 2 * d))
  return a @ a.T / a.shape[1]


def _psd_sqrt(m):
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form_fid(mu1, s1, mu2, s2):
  # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by eigendecompositions.
  r1 = _psd_sqrt(s1)
  cross = _psd_sqrt(r1 @ s2 @ r1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_feature_statistics_match_numpy_mean_and_cov():
  x = np.random.default_rng(0).normal(size=(1001, 37)).astype(np.float32) * 3 + 5
  mu, sigma = fid.feature_statistics(x, chunk_size=100)  # 11 chunks
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False),
                             rtol=1e-10, atol=1e-12)
  assert mu.dtype == sigma.dtype == np.float64


def test_fid_of_a_feature_set_with_itself_is_zero():
  x = np.random.default_rng(1).normal(size=(500, 64))
  x[:, :8] *= 10  # uneven spectrum
  assert abs(fid.fid_from_features(x, x)) < 1e-8
  assert fid.fid_from_features(x, x + 0.5) == pytest.approx(64 * 0.25, rel=1e-8)


def test_fid_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(2)
  d = 20
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("rank", [None, 30])  # full rank, and singular (rank 30 < d = 64)
def test_fid_general_gaussians_match_eigendecomposition(rank, method):
  rng = np.random.default_rng(3)
  d = 64
  s1, s2 = _random_spd(rng, d, rank), _random_spd(rng, d, rank)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = fid.frechet_distance(mu1, s1, mu2, s2, method=method)
  # The closed form is written with the roles of S1 and S2 swapped (same value).
  assert got == pytest.approx(_closed_form_fid(mu2, s2, mu1, s1), rel=1e-7, abs=1e-7)


def test_fid_rejects_mismatched_or_invalid_statistics():
  with pytest.raises(ValueError, match="shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="method"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
  with pytest.raises(ValueError, match="non-finite"):
    fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_statistics_npz_round_trip_and_ttur_layout(tmp_path):
  rng = np.random.default_rng(4)
  mu, sigma = rng.normal(size=16), _random_spd(rng, 16)
  path = str(tmp_path / "stats.npz")
  fid.save_statistics(path, mu, sigma, {"origin": "mnist.npz:x_train", "num_images": 7})
  mu2, sigma2, meta = fid.load_statistics(path, with_metadata=True)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert meta == {"origin": "mnist.npz:x_train", "num_images": "7"}
  with np.load(path, allow_pickle=False) as data:  # readable without pickle
    assert {"mu", "sigma"} <= set(data.files)
  # A TTUR/pytorch-fid style file (float32, only mu and sigma) is read too.
  ttur = str(tmp_path / "ttur.npz")
  np.savez(ttur, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
  mu3, sigma3 = fid.load_statistics(ttur)
  assert mu3.dtype == np.float64 and np.allclose(sigma3, sigma, atol=1e-6)
  # The command line on two statistics files.
  result = fid_tool.evaluate(path, ttur)
  assert result["fid"] == pytest.approx(0.0, abs=1e-4)
  np.savez(str(tmp_path / "bad.npz"), m=mu)
  with pytest.raises(ValueError, match="'mu' and 'sigma'"):
    fid.load_statistics(str(tmp_path / "bad.npz"))
  with pytest.raises(FileNotFoundError, match="fid_stats"):
    fid.load_statistics(str(tmp_path / "none.npz"))
  assert json.dumps(result)


def test_inception_score_matches_scipy_reference():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(1003, 1008)).astype(np.float32) * 4  # uneven split sizes
  mean, std = inception_score.inception_score(logits, splits=10)
  n, scores = logits.shape[0], []
  for i in range(10):
    part = scipy.special.softmax(logits[i * n // 10:(i + 1) * n // 10].astype(np.float64),
                                 axis=1)
    py = part.mean(0)
    kl = scipy.special.rel_entr(part, py[None]).sum(1)
    scores.append(np.exp(kl.mean()))
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_inception_score_closed_forms():
  # Confident predictions spread evenly over K classes in every split: IS = K.
  k, n = 7, 700
  logits = np.full((n, 1008), -60.0)
  logits[np.arange(n), np.arange(n) % k] = 60.0
  mean, std = inception_score.inception_score(logits, splits=10)
  assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9
  # Identical predictions for every image: IS = 1.
  same = np.tile(np.random.default_rng(6).normal(size=(1, 1008)), (50, 1))
  assert inception_score.inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match="at least"):
    inception_score.inception_score(same[:3], splits=10)


def _brute_force_precision_recall(real, fake, k):
  def radii(x):
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.sort(d, axis=1)[:, k]  # index 0 is the sample itself

  def coverage(q, ref, r):
    d = ((q[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    return np.mean((d <= r[None, :]).any(axis=1))

  return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_brute_force():
  rng = np.random.default_rng(7)
  real = rng.normal(size=(300, 16))
  fake = rng.normal(size=(250, 16)) * 1.3 + 0.4
  got = precision_recall.precision_recall(real, fake, k=3, chunk_size=64)
  p, r = _brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3)
  assert got["precision"] == pytest.approx(p, abs=1 / 250)
  assert got["recall"] == pytest.approx(r, abs=1 / 300)
  # Wider, shifted fakes: they cover the reals (high recall) but many fall outside them.
  assert 0.1 < got["precision"] < 0.6 < 0.9 < got["recall"] < 1.0
  same = precision_recall.precision_recall(real, real, k=3)
  assert same == {"precision": 1.0, "recall": 1.0}


def test_rebatching_keeps_order_and_sizes():
  chunks = [np.arange(n) + s for s, n in ((0, 3), (3, 5), (8, 1), (9, 7))]
  batches = list(features_lib._rebatch(iter(chunks), 4))  # pylint: disable=protected-access
  assert [b.shape[0] for b in batches] == [4, 4, 4, 4]
  np.testing.assert_array_equal(np.concatenate(batches), np.arange(16))
  batches = list(features_lib._rebatch(np.arange(10), 4))  # pylint: disable=protected-access
  assert [b.shape[0] for b in batches] == [4, 4, 2]
