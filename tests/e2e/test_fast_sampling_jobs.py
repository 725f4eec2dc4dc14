"""The sampling job with a few-step sampler and the DDIM inversion job on a tiny checkpoint.

References: the math-layer functions called directly on one device, with the documented
per-index keys (sampling) and the source images themselves (inversion).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import inversion
from diffusion_jax.diffusion import timesteps
from diffusion_jax.evaluation import invert_job
from diffusion_jax.evaluation import modes
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results
from diffusion_jax.evaluation import sample_job
from diffusion_jax.training import checkpointing
import eval_testlib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  with eval_testlib.persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    yield eval_testlib.make_workdir(str(tmp_path_factory.mktemp("fast_workdir")))[0]


def _one_device(config, path):
  return restore.load_eval_model(config, path, sharding.make_mesh(jax.devices()[:1]))


def test_sample_job_with_dpm_solver(workdir):
  """sampling.sampler=dpmpp_2m: the set equals DPM-Solver++(2M) over the documented grid
  and keys on one device; the manifest records the grid."""
  config = eval_testlib.tiny_eval_config()
  config.sampling.sampler = "dpmpp_2m"
  config.sampling.num_steps = 6
  config.sampling.num_samples = 8
  summary = sample_job.generate_samples(config, workdir)
  name = f"step{eval_testlib.STEP}_dpmpp_2m6_logsnr_seed0"
  assert os.path.basename(summary["directory"]) == name
  assert summary["network_calls"] == 6 and summary["spacing"] == "logsnr"
  images = sample_job.load_samples(summary["directory"])
  model = _one_device(config, workdir)
  base = jax.random.fold_in(jax.random.key(config.seed), streams.SAMPLE)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(8))
  betas = np.linspace(1e-4, 0.02, 20)
  grid = timesteps.make_grid(betas, 6, "logsnr")
  out = jax.jit(lambda p, k: dpm_solver.sample(
      model.model_fn(p), model.schedule, k, (8, 8, 1), grid, order=2,
      transform=denoiser.X0Transform(clip=True)))(model.params, keys)
  expected = np.clip(np.round((np.asarray(out, np.float64) + 1) * 127.5), 0, 255)
  np.testing.assert_array_equal(images, expected.astype(np.uint8))
  with open(os.path.join(summary["directory"], "manifest.json")) as f:
    assert json.load(f)["final_step"] == "zero"
  # The raw parameters make their own set beside the EMA one.
  config.eval.use_ema = False
  raw = sample_job.generate_samples(config, workdir)
  raw_name = f"step{eval_testlib.STEP}_raw_dpmpp_2m6_logsnr_seed0"
  assert os.path.basename(raw["directory"]) == raw_name
  with open(os.path.join(raw["directory"], "manifest.json")) as f:
    assert json.load(f)["params"] == "params"
  np.testing.assert_array_equal(sample_job.load_samples(summary["directory"]), images)


def test_sde_sampler_is_a_function_of_each_index(workdir):
  """sampling.sampler=dpmpp_2m_sde: SDE-DPM-Solver++(2M) with its noise from each sample's
  key; a sample is the same whichever batch (and device split) computes it."""
  config = eval_testlib.tiny_eval_config()
  config.sampling.sampler = "dpmpp_2m_sde"
  config.sampling.num_steps = 6
  assert sampling.tag(config) == "dpmpp_2m_sde6_logsnr_seed0"
  assert sampling.network_calls(config) == 6
  model = restore.load_eval_model(config, workdir)
  sample_fn = sampling.make_sample_fn(model.model, model.schedule, config, model.mesh)
  all8 = sampling.sample_indices(sample_fn, model.params, np.arange(8), model.mesh)
  last4 = sampling.sample_indices(sample_fn, model.params, np.arange(4, 12), model.mesh)
  np.testing.assert_allclose(all8[4:], last4[:4], rtol=0, atol=1e-5)
  one = _one_device(config, workdir)
  base = jax.random.fold_in(jax.random.key(config.seed), streams.SAMPLE)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(8))
  grid = timesteps.make_grid(np.linspace(1e-4, 0.02, 20), 6, "logsnr")
  direct = jax.jit(lambda p, k: dpm_solver.sample(
      one.model_fn(p), one.schedule, k, (8, 8, 1), grid, order=2,
      algorithm="sde-dpmsolver++", transform=denoiser.X0Transform(clip=True)))(
          one.params, keys)
  np.testing.assert_allclose(all8, np.asarray(direct), rtol=0, atol=1e-5)
  config.sampling.sampler = "dpmpp_2m"
  ode_fn = sampling.make_sample_fn(model.model, model.schedule, config, model.mesh)
  assert np.max(np.abs(sampling.sample_indices(ode_fn, model.params, np.arange(8),
                                               model.mesh) - all8)) > 1e-2


def test_bad_sampler_settings_name_the_fix():
  config = eval_testlib.tiny_eval_config()
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 5
  config.sampling.final_step = "t0"
  with pytest.raises(ValueError, match="sampling.final_step=zero"):
    sampling.check_sampler(config)
  config.sampling.sampler, config.sampling.spacing = "dpmpp_2m", "uniform"
  with pytest.raises(ValueError, match="already evaluates the network there"):
    sampling.check_sampler(config)
  config.sampling.spacing, config.sampling.final_step = "cosine", "zero"
  with pytest.raises(ValueError, match="Unknown sampling.spacing 'cosine'"):
    sampling.check_sampler(config)
  config.sampling.spacing, config.sampling.num_steps = "", 21
  with pytest.raises(ValueError, match=r"num_steps=21 must be in \[1, .*=20\]"):
    sampling.check_sampler(config)
  config.sampling.num_steps, config.sampling.sampler = 5, "respaced"
  config.sampling.spacing = "logsnr"
  with pytest.raises(ValueError, match="needs integer timesteps"):
    sampling.check_sampler(config)
  config.sampling.sampler, config.sampling.threshold_ratio = "ancestral", 0.99
  with pytest.raises(ValueError, match="use sampler=respaced with num_steps=T"):
    sampling.check_sampler(config)
  config.sampling.sampler, config.sampling.spacing = "heun", ""
  config.sampling.threshold_ratio, config.sampling.karras_rho = 0.0, 0.0
  with pytest.raises(ValueError, match="karras_rho=0.0 must be > 0"):
    sampling.check_sampler(config)
  config.sampling.karras_rho = 7.0
  assert sampling.network_calls(config) == 9  # 2 x 5 - 1 into the noise-free end
  config.sampling.churn = 2.0
  assert "_seed0" in sampling.tag(config) and sampling.tag(config) != "heun5_karras_seed0"


def _digits(n):
  config = eval_testlib.tiny_eval_config()
  return sources.load_source(config.data, config.data.eval_split).images[:n]


def test_invert_mode_shards_resume_and_match_direct_inversion(workdir, tmp_path,
                                                             monkeypatch):
  config = eval_testlib.tiny_eval_config()
  config.sampling.num_steps = 5
  config.sampling.invert_num_images = 12
  config.sampling.invert_fixed_point_iterations = 1
  assert modes.MODES["invert"] is invert_job.invert_images
  summary = invert_job.invert_images(config, workdir)
  directory = summary["directory"]
  assert sorted(os.listdir(directory)) == ["manifest.json"] + [
      f"shard_{k:06d}.npz" for k in range(3)]  # shards of 5, 5, 2
  data = [np.load(os.path.join(directory, f"shard_{k:06d}.npz")) for k in range(3)]
  latents = np.concatenate([d["latents"] for d in data])
  recons = np.concatenate([d["reconstructions"] for d in data])
  originals = np.concatenate([d["images"] for d in data])
  np.testing.assert_array_equal(originals, _digits(12))
  # Direct: one device, the 12 images at once, the DDIM grid of 5 uniform steps.
  model = _one_device(config, workdir)
  grid = timesteps.make_grid(np.linspace(1e-4, 0.02, 20), 5, "uniform")
  x0 = input_pipeline.PIXEL_VALUES[originals]
  fn = model.model_fn(model.params)

  @jax.jit
  def direct(x):
    z = inversion.encode(fn, model.schedule, x, grid, fixed_point_iterations=1)
    return z, inversion.decode(fn, model.schedule, z, grid)

  z, rec = direct(x0)
  np.testing.assert_allclose(latents, z, rtol=0, atol=2e-5)
  np.testing.assert_allclose(recons, rec, rtol=0, atol=2e-5)
  rms = float(np.sqrt(np.mean((recons.astype(np.float64) - x0)**2)))
  assert summary["reconstruction_rms"] == pytest.approx(rms, rel=1e-6)
  assert summary["network_calls_encode"] == 10 and summary["timesteps"] == [16, 12, 8, 4, 0]
  with open(summary["summary_json"]) as f:
    assert json.load(f)["reconstruction_rms"] == summary["reconstruction_rms"]

  # Killed after its first shard, then resumed in a copy of the workdir: the same files.
  other = str(tmp_path / "killed")
  shutil.copytree(os.path.join(workdir, checkpointing.CHECKPOINT_DIR),
                  os.path.join(other, checkpointing.CHECKPOINT_DIR))
  real_save = results.save_npz_atomic

  def save_then_die(path, **arrays):
    real_save(path, **arrays)
    raise KeyboardInterrupt("killed")

  monkeypatch.setattr(results, "save_npz_atomic", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    invert_job.invert_images(config, other)
  monkeypatch.setattr(results, "save_npz_atomic", real_save)
  resumed = invert_job.invert_images(config, other)["directory"]
  for k in range(3):
    with np.load(os.path.join(resumed, f"shard_{k:06d}.npz")) as d:
      np.testing.assert_array_equal(d["latents"], data[k]["latents"])
  # Other settings never mix into the directory; an .npz source works the same.
  config.sampling.shard_size = 6
  with pytest.raises(ValueError, match="shard_size"):
    invert_job.invert_images(config, workdir)
  npz = str(tmp_path / "images.npz")
  np.savez(npz, x=_digits(12)[:, :, :, 0])
  config.sampling.shard_size, config.sampling.invert_source = 12, npz + ":x"
  from_npz = invert_job.invert_images(config, workdir)
  with np.load(os.path.join(from_npz["directory"], "shard_000000.npz")) as d:
    np.testing.assert_allclose(d["latents"], latents, rtol=0, atol=2e-5)
