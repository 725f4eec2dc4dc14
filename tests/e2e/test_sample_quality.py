"""FID/KID for a training loop: references computed once, cached in the workdir, reused.

A stand-in feature network (the pixels as features; the real Inception is tested in
test_inception.py) counts how many images it sees, so the test can tell that a second
`SampleQuality` on the same workdir reads the cached references instead of recomputing
them. The numbers are checked against direct float64 computations of FID and KID.
"""

import os

import numpy as np
import pytest

from diffusion_jax import streams
from diffusion_jax.data import sources
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import kid
from diffusion_jax.evaluation import sample_quality
import eval_testlib


class PixelFeatures:
  """[N, 8, 8, 1] uint8 -> [N, 64] float32 features; counts the images it was given."""
  batch_size = 8

  def __init__(self):
    self.seen = 0

  def __call__(self, images, log_every=0):
    del log_every
    batches = [np.asarray(images)] if isinstance(images, np.ndarray) else list(images)
    out = np.concatenate(batches).reshape(-1, 64).astype(np.float32) / 16.0
    self.seen += out.shape[0]
    return {"pool3": out}


def _mmd2(x, y):
  """Unbiased MMD^2 under (x.y / d + 1)^3, from the kernel matrices' off-diagonal means."""
  k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
  off = lambda m: m[~np.eye(len(m), dtype=bool)].mean()
  return off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()


def _config(tmp_path):
  config = eval_testlib.tiny_eval_config()
  config.data.train_split = "train[:40]"
  config.data.eval_split = "train[40:80]"
  config.eval.fid_method = "eigh"
  config.eval.kid_subsets, config.eval.kid_subset_size = 20, 16
  weights = tmp_path / "weights.npz"
  weights.write_bytes(b"")  # only checked to exist: the features are the stand-in's
  config.eval.inception_weights = str(weights)
  return config


def test_references_are_computed_once_and_metrics_match(tmp_path):
  config = _config(tmp_path)
  workdir = str(tmp_path / "workdir")
  extractor = PixelFeatures()
  quality = sample_quality.SampleQuality(config, workdir, extractor=extractor,
                                         inception_source="pixels")
  assert extractor.seen == 80  # 40 train + 40 test images, once
  digits = sources.load_source(config.data, "train").images  # uint8 [N, 8, 8, 1]
  samples = digits[100:130]  # "samples": other digits
  metrics = quality.evaluate(samples)
  assert extractor.seen == 110
  again = sample_quality.SampleQuality(config, workdir, extractor=extractor,
                                       inception_source="pixels")
  assert extractor.seen == 110  # the cached references are read, not recomputed
  assert again.metrics(extractor(samples)["pool3"]) == metrics
  cached = [f for f in os.listdir(os.path.join(workdir, "eval"))
            if f.startswith("fid_reference_")]
  assert len(cached) == 2

  feats = samples.reshape(-1, 64).astype(np.float64) / 16.0
  for role, rows in (("", slice(0, 40)), ("_test", slice(40, 80))):
    ref = digits[rows].reshape(-1, 64).astype(np.float64) / 16.0
    want = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False),
                                ref.mean(0), np.cov(ref, rowvar=False), method="eigh")
    assert metrics[f"fid{role}"] == pytest.approx(want, rel=1e-5), role
    ra, rb = kid.subset_indices(30, 40, 20, 16, [int(config.seed), streams.KID])
    values = [_mmd2(feats[a], ref[b]) for a, b in zip(ra, rb)]
    assert metrics[f"kid{role}"] == pytest.approx(np.mean(values), rel=1e-6), role
  assert metrics["fid_reference"]["origin"] == "digits:train[:40]"
  assert metrics["fid_test_reference"]["origin"] == "digits:train[40:80]"
  assert metrics["num_samples"] == 30 and metrics["kid_subset_size"] == 16
  assert metrics["precision_recall_num_images"] == [40, 30]


def test_statistics_only_reference_file_and_bad_settings(tmp_path):
  config = _config(tmp_path)
  config.eval.fid_references = ("train",)
  stats = tmp_path / "stats.npz"
  fid.save_statistics(str(stats), np.zeros(64), np.eye(64))
  config.eval.fid_reference = str(stats)
  extractor = PixelFeatures()
  quality = sample_quality.SampleQuality(config, str(tmp_path / "w"), extractor=extractor)
  assert extractor.seen == 0  # nothing computed for a file reference
  out = quality.metrics(np.random.default_rng(0).standard_normal((10, 64)))
  assert np.isfinite(out["fid"]) and out["kid"] is None and "features" in out["kid_note"]
  assert "fid_test" not in out and "precision" not in out
  config.eval.fid_references = ("train", "valid")
  with pytest.raises(ValueError, match="fid_references"):
    sample_quality.check_inputs(config)
  config.eval.fid_references = ("train",)
  config.eval.kid_subset_size = 1
  with pytest.raises(ValueError, match="kid_subset_size"):
    sample_quality.check_inputs(config)
