"""FID during training: every N steps a fast sampler's samples of the EMA parameters are
scored against reference statistics computed once and cached in the workdir."""

import os

import pytest
import tensorflow as tf

from diffusion_jax.tools import convert_inception
from diffusion_jax.training import train
import training_testlib


def _scalars(workdir):
  """{tag: [(step, value)]} of the run's TensorBoard events."""
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        number = (tf.make_ndarray(value.tensor) if value.HasField("tensor")
                  else value.simple_value)
        if getattr(number, "ndim", 0) == 0:  # scalars only (not images or text)
          out.setdefault(value.tag, []).append((event.step, float(number)))
  return out


def test_fid_and_kid_are_logged_and_the_references_computed_once(tmp_path, caplog):
  weights = str(tmp_path / "inception.npz")
  config = training_testlib.digits_smoke(
      "--config.training.num_train_steps=10", "--config.training.fid_every_steps=5",
      "--config.training.fid_num_samples=8", "--config.training.fid_num_steps=4",
      "--config.eval.fid_batch_size=8", "--config.eval.fid_method=eigh",
      "--config.eval.fid_reference_num_images=8", "--config.eval.kid_subset_size=4",
      "--config.eval.kid_subsets=4", "--config.eval.pr_num_images=0",
      f"--config.eval.inception_weights={weights}")
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    train.train_and_evaluate(config, str(workdir))  # before anything is written
  assert not workdir.exists()
  convert_inception.convert(None, weights)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(config, str(workdir))
  scalars = _scalars(workdir)
  assert [s for s, _ in scalars["fid/fid"]] == [5, 10], scalars.keys()
  assert [s for s, _ in scalars["kid/kid"]] == [5, 10]
  assert all(v > 0 for _, v in scalars["fid/fid"])
  cached = [f for f in os.listdir(workdir / "eval") if f.startswith("fid_reference_")]
  assert len(cached) == 1  # computed at the first evaluation, read at the second
  assert caplog.text.count("dpmpp_2m4") >= 2
