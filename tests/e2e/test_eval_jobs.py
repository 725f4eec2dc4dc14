"""Evaluation jobs on a tiny checkpoint: sampling shards and bits/dim, sharded and resumed.

References: the samplers and `bound.calc_bpd` called directly on one device with the
documented per-index keys, and float64 NumPy for the rate-distortion table.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.diffusion import bound
from diffusion_jax.training import checkpointing
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import samplers
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.evaluation import bpd_job
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results
from diffusion_jax.evaluation import sample_job
import eval_testlib

STEP = eval_testlib.STEP
_config = eval_testlib.tiny_eval_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  with eval_testlib.persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    yield eval_testlib.make_workdir(str(tmp_path_factory.mktemp("eval_workdir")))


def test_restore_uses_ema_and_refuses_empty_workdir(workdir, tmp_path):
  path, ema = workdir
  model = restore.load_eval_model(_config(), path)
  assert model.step == STEP and model.params_kind == "ema"
  for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(ema)):
    np.testing.assert_array_equal(np.asarray(a), b)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    restore.load_eval_model(_config(), str(tmp_path))
  assert not os.listdir(tmp_path)  # nothing written


def _reference_samples(config, workdir_path, indices):
  """Ancestral samples of the given indices on ONE device, keys built from the docs."""
  model = restore.load_eval_model(config, workdir_path, sharding.make_mesh(jax.devices()[:1]))
  # The documented key of sample i: fold_in(fold_in(key(seed), SAMPLE_STREAM), i).
  base = jax.random.fold_in(jax.random.key(config.seed), streams.SAMPLE)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices))
  d = config.diffusion
  out = jax.jit(lambda p, k: samplers.ancestral_sample(
      model.model_fn(p), model.schedule, k, (8, 8, 1), model_mean_type=d.model_mean_type,
      model_var_type=d.model_var_type, clip_denoised=True))(model.params, keys)
  return np.clip(np.round((np.asarray(out, np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def _shard_seconds(directory: str, k: int) -> float:
  """The generation time stored in shard k of a sample set."""
  with np.load(sample_job.shard_path(directory, k)) as data:
    return float(data["seconds"])


def test_sampling_sharded_resumed_equals_one_device(workdir, tmp_path, monkeypatch):
  path, _ = workdir
  config = _config()
  # Uninterrupted run over 8 devices.
  summary = sample_job.generate_samples(config, path)
  full = sample_job.load_samples(summary["directory"])
  assert full.shape == (12, 8, 8, 1) and full.dtype == np.uint8
  assert len(os.listdir(summary["directory"])) == 4  # 3 shards + manifest
  shard_seconds = [_shard_seconds(summary["directory"], k) for k in range(3)]
  assert min(shard_seconds) > 0
  assert summary["sampling_seconds"] == pytest.approx(sum(shard_seconds), rel=1e-12)
  # Same indices on one device, in one batch of 12.
  np.testing.assert_array_equal(full, _reference_samples(config, path, np.arange(12)))
  assert len({full[i].tobytes() for i in range(12)}) == 12  # distinct samples

  # A run killed after its first shard, then resumed in another workdir copy.
  other = str(tmp_path / "killed")
  shutil.copytree(os.path.join(path, checkpointing.CHECKPOINT_DIR),
                  os.path.join(other, checkpointing.CHECKPOINT_DIR))
  real_save, calls = results.save_npz_atomic, []

  def save_then_die(p, **arrays):
    if calls:
      raise KeyboardInterrupt("killed")
    calls.append(p)
    real_save(p, **arrays)

  monkeypatch.setattr(results, "save_npz_atomic", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    sample_job.generate_samples(config, other)
  monkeypatch.setattr(results, "save_npz_atomic", real_save)
  killed_dir = os.path.join(other, os.path.relpath(summary["directory"], path))
  first_seconds = _shard_seconds(killed_dir, 0)
  resumed = sample_job.generate_samples(config, other)
  resumed_dir = resumed["directory"]
  assert sorted(os.listdir(resumed_dir)) == sorted(os.listdir(summary["directory"]))
  # The time of the shard written before the kill is kept in the set's total.
  assert _shard_seconds(resumed_dir, 0) == first_seconds
  assert resumed["sampling_seconds"] == pytest.approx(
      first_seconds + _shard_seconds(resumed_dir, 1) + _shard_seconds(resumed_dir, 2))
  np.testing.assert_array_equal(sample_job.load_samples(resumed_dir), full)

  # A smaller set (its last shard short), then the full number: the short shard is
  # completed, and the set equals the uninterrupted one.
  grown = str(tmp_path / "grown")
  shutil.copytree(os.path.join(path, checkpointing.CHECKPOINT_DIR),
                  os.path.join(grown, checkpointing.CHECKPOINT_DIR))
  config.sampling.num_samples = 7
  small_dir = sample_job.generate_samples(config, grown)["directory"]
  np.testing.assert_array_equal(sample_job.load_samples(small_dir), full[:7])
  short_seconds = _shard_seconds(small_dir, 1)  # shard 1 holds samples 5-6 of 5-9
  config.sampling.num_samples = 12
  grown_dir = sample_job.generate_samples(config, grown)["directory"]
  np.testing.assert_array_equal(sample_job.load_samples(grown_dir), full)
  assert _shard_seconds(grown_dir, 1) > short_seconds  # its completion's time added

  # Partial results of other settings are never mixed in.
  config.sampling.shard_size = 6
  with pytest.raises(ValueError, match="shard_size"):
    sample_job.generate_samples(config, path)


def test_bpd_job_chunks_resume_and_match_direct_bound(workdir, monkeypatch):
  path, ema = workdir
  config = _config()
  real_save = results.save_npz_atomic

  def die(p, **arrays):
    real_save(p, **arrays)
    raise KeyboardInterrupt("killed after the first chunk")

  monkeypatch.setattr(results, "save_npz_atomic", die)
  with pytest.raises(KeyboardInterrupt):
    bpd_job.evaluate_bpd(config, path)
  directory = bpd_job.chunk_dir(path, "train[:24]", STEP)
  assert sorted(os.listdir(directory)) == ["batch_000000.npz", "manifest.json"]
  monkeypatch.setattr(results, "save_npz_atomic", real_save)
  summary = bpd_job.evaluate_bpd(config, path)
  assert summary["num_images"] == 12 and summary["checkpoint_step"] == STEP

  # Direct bound on one device, all 12 images at once, keys fold_in(base, image index).
  model = restore.load_eval_model(config, path, sharding.make_mesh(jax.devices()[:1]))
  source_images = np.asarray(input_pipeline.PIXEL_VALUES[
      _digits_uint8(config)[:12]])  # [12, 8, 8, 1] in [-1, 1]
  base = jax.random.fold_in(jax.random.key(config.seed), streams.BPD)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(12))
  d = config.diffusion
  direct = jax.device_get(jax.jit(lambda p, x, k: bound.calc_bpd(
      model.model_fn(p), model.schedule, x, k, model_mean_type=d.model_mean_type,
      model_var_type=d.model_var_type, clip_denoised=True))(model.params, source_images, keys))
  for name in ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd"):
    assert summary[name] == pytest.approx(float(np.mean(direct[name])), rel=2e-5), name

  # Table 4 from the direct terms, float64: rate = L_T + sum_{s >= t} L_s (s >= 1).
  terms = np.asarray(direct["terms_bpd"], np.float64).mean(0)  # [T]
  mse = np.asarray(direct["mse"], np.float64).mean(0)
  prior = float(np.mean(direct["prior_bpd"]))
  num_t = 20
  expected = []
  for reverse_time in (20, 18, 16, 14, 12, 10, 8, 6, 4, 2):
    t = num_t - reverse_time + 1
    expected.append((reverse_time, prior + terms[t:].sum() if t >= 1 else 0.0,
                     np.sqrt(mse[t - 1]) * 127.5))
  got = [(r["reverse_time"], r["rate_bpd"], r["distortion_rmse"]) for r in summary["table4"]]
  assert [g[0] for g in got] == [e[0] for e in expected]
  np.testing.assert_allclose([g[1:] for g in got], [e[1:] for e in expected], rtol=1e-4)
  # At reverse time T, rate + decoder = the whole bound.
  assert got[0][1] + summary["decoder_bpd"] == pytest.approx(summary["total_bpd"], rel=1e-5)
  for f in summary["files"].values():
    assert os.path.getsize(f) > 0
  with open(summary["summary_json"]) as f:
    assert json.load(f)["total_bpd"] == summary["total_bpd"]


def _digits_uint8(config):
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.load_source(config.data, config.data.eval_split).images
