"""The FID job on a tiny checkpoint: samples -> JAX Inception -> FID against data statistics.

The Inception network itself is checked against PyTorch in test_inception.py; here the
job's plumbing: it fails before sampling without weights, it reports the distance between
the statistics it stores, with the origin of the reference, and no IS without logits.
"""

import json
import os

import numpy as np
import pytest

from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import fid_job
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
  config.data.train_split = "train[:8]"  # the FID reference: 8 digits
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
  assert os.path.basename(summary["summary_json"]).startswith("fid_step")
  assert os.path.basename(written["samples_summary_json"]).startswith("samples_")
  assert os.path.exists(written["samples_summary_json"])
  # The reported FID is the distance between the statistics files the job left: the
  # samples' (next to them) and the data reference's (cached under eval/ with its origin).
  cached = [f for f in os.listdir(os.path.join(workdir, "eval"))
            if f.startswith("fid_reference_")]
  assert len(cached) == 1
  ref_mu, ref_sigma, ref_meta = fid.load_statistics(
      os.path.join(workdir, "eval", cached[0]), with_metadata=True)
  assert ref_meta["num_images"] == "8" and ref_meta["split"] == "train[:8]"
  mu, sigma, meta = fid.load_statistics(
      os.path.join(summary["directory"], "fid_stats.npz"), with_metadata=True)
  assert meta["num_images"] == "8" and meta["inception"].startswith("torchscript:")
  assert mu.shape == ref_mu.shape == (2048,) and sigma.shape == (2048, 2048)
  assert np.all(np.isfinite(sigma)) and np.linalg.norm(mu - ref_mu) > 0.1
  assert np.isfinite(summary["fid"])
  # The reported number is mu's part plus the trace part: at least ||mu - mu_ref||^2.
  assert summary["fid"] >= float(np.sum((mu - ref_mu) ** 2)) - 1e-6
