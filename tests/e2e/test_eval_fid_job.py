"""The FID job on a tiny checkpoint: samples -> JAX Inception -> FID against data statistics.

The Inception network itself is checked against PyTorch in test_inception.py; here the
job's plumbing: it fails before sampling without weights, it reports the distances between
the statistics it stores (train and test references, with their origins), KID against a
NumPy computation on the stored features, and no IS without logits.
"""

import json
import os

import numpy as np
import pytest

from diffusion_jax import streams
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import fid_job
from diffusion_jax.evaluation import kid
from diffusion_jax.evaluation import sample_job
from diffusion_jax.tools import convert_inception
import eval_testlib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  with eval_testlib.persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    yield eval_testlib.make_workdir(str(tmp_path_factory.mktemp("eval_workdir")))[0]


def _config():
  config = eval_testlib.tiny_eval_config()
  config.sampling.num_samples = 8
  config.sampling.shard_size = 8
  config.data.train_split = "train[:8]"  # the train reference: 8 digits
  config.data.eval_split = "train[8:16]"  # the test reference: 8 others
  config.eval.fid_batch_size = 8
  # 8 images give singular covariances, where scipy's sqrtm of a 2048 x 2048 product
  # takes minutes on a 2-core CPU; the two methods agree (test_fid.py).
  config.eval.fid_method = "eigh"
  return config


def test_fid_job_end_to_end_with_data_reference(workdir, tmp_path_factory):
  config = _config()
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    fid_job.evaluate_fid(config, workdir)  # fails before any sampling
  assert not os.path.exists(os.path.join(workdir, sample_job.SAMPLES_DIR))
  weights = str(tmp_path_factory.mktemp("inception") / "inception.npz")
  convert_inception.convert(None, weights)
  config.eval.inception_weights = weights
  summary = fid_job.evaluate_fid(config, workdir)
  assert summary["num_samples"] == 8 and summary["checkpoint_step"] == eval_testlib.STEP
  assert summary["sampler"] == "ancestral" and summary["params"] == "ema"
  assert summary["fid_reference"]["origin"] == "digits:train[:8]"
  assert summary["inception_score"] is None and "classifier" in summary["inception_score_note"]
  with open(summary["summary_json"]) as f:
    written = json.load(f)
  assert written["fid"] == summary["fid"]
  # The summary names its own file, and the sampling job's separately.
  assert written["summary_json"] == summary["summary_json"]
  # Each sample set has its own: fid_<set>_step<step>.json beside samples_<set>_step<step>.
  assert (os.path.basename(summary["summary_json"]) ==
          os.path.basename(written["samples_summary_json"]).replace("samples_", "fid_", 1))
  assert os.path.basename(summary["summary_json"]).startswith("fid_ancestral")
  assert os.path.exists(written["samples_summary_json"])
  # The reported FIDs are the distances between the statistics files the job left: the
  # samples' (next to them) and the references' (cached under eval/ with their origin).
  cached = sorted(f for f in os.listdir(os.path.join(workdir, "eval"))
                  if f.startswith("fid_reference_"))
  assert len(cached) == 2  # train and test references, computed once
  refs = {}
  for name in cached:
    mu_r, sigma_r, meta_r = fid.load_statistics(os.path.join(workdir, "eval", name),
                                                with_metadata=True)
    with np.load(os.path.join(workdir, "eval", name)) as data:
      refs[meta_r["split"]] = (mu_r, sigma_r, meta_r, data["features"])
  ref_mu, _, ref_meta, ref_features = refs["train[:8]"]
  assert ref_meta["num_images"] == "8" and ref_features.shape == (8, 2048)
  assert refs["train[8:16]"][2]["num_images"] == "8"  # the test role: data.eval_split
  mu, sigma, meta = fid.load_statistics(
      os.path.join(summary["directory"], "fid_stats.npz"), with_metadata=True)
  assert meta["num_images"] == "8" and meta["inception"].startswith("torchscript:")
  assert mu.shape == ref_mu.shape == (2048,) and sigma.shape == (2048, 2048)
  assert np.all(np.isfinite(sigma)) and np.linalg.norm(mu - ref_mu) > 0.1
  with np.load(os.path.join(summary["directory"], "inception_features.npz")) as data:
    sample_features = data["pool3"].astype(np.float64)
  np.testing.assert_allclose(sample_features.mean(0), mu, rtol=1e-6, atol=1e-9)
  # FID from the features, in low-rank form: with A, B the centred features, the
  # trace of (S_a S_b)^1/2 is the sum of the singular values of A B^T over sqrt((n-1)(m-1)).
  for role, split in (("", "train[:8]"), ("_test", "train[8:16]")):
    feats = refs[split][3].astype(np.float64)
    a = sample_features - sample_features.mean(0)
    b = feats - feats.mean(0)
    trace_root = np.linalg.svd(a @ b.T, compute_uv=False).sum() / 7.0
    want = (np.sum((sample_features.mean(0) - feats.mean(0)) ** 2) + np.sum(a * a) / 7
            + np.sum(b * b) / 7 - 2 * trace_root)
    assert summary[f"fid{role}"] == pytest.approx(want, rel=1e-5), role
  assert summary["fid_test_reference"]["origin"] == "digits:train[8:16]"
  # KID on the stored features, against a NumPy U-statistic on the documented subsets.
  rows_s, rows_r = kid.subset_indices(8, 8, 100, 1000, [0, streams.KID])
  values = []
  for ra, rb in zip(rows_s, rows_r):
    x, y = sample_features[ra], ref_features[rb].astype(np.float64)
    kxx = (x @ x.T / 2048 + 1) ** 3
    kyy = (y @ y.T / 2048 + 1) ** 3
    kxy = (x @ y.T / 2048 + 1) ** 3
    off = lambda k: k[~np.eye(8, dtype=bool)].mean()
    values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
  assert summary["kid"] == pytest.approx(np.mean(values), rel=1e-6)
  assert summary["kid_std"] == pytest.approx(np.std(values), rel=1e-6)
  assert summary["kid_subset_size"] == 8 and np.isfinite(summary["kid_test"])
  assert 0 <= summary["precision"] <= 1 and 0 <= summary["recall"] <= 1
