"""Released models by name, offline: a hub cache prepared here in huggingface_hub's layout
(models--owner--name/{refs/main, snapshots/<commit>/..., blobs/}), and the experiment
config inferred from each published config.json layout. Nothing is downloaded: every
lookup is offline (`offline=True` or a cached snapshot, which is used without the
network)."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax import config_base
from diffusion_jax import models
from diffusion_jax.convert import diffusers_weights
from diffusion_jax.convert import released_models
from diffusion_jax.tools import import_checkpoint
from diffusion_jax.training import params_checkpoint
from unet_fixtures import DDPM_256, DDPM_CIFAR10_32, DDPM_CIFAR10_32_RESAVED, SMALL
from unet_fixtures import SMALL_DIFFUSERS, random_params

COMMIT = "3f2b6c1d0e9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
# The scheduler config published with the DDPM models (DDPMScheduler).
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
             "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
             "trained_betas": None, "variance_type": "fixed_large"}


def make_hub_cache(cache, repo_id, files):
  """Writes `files` ({relative name: bytes}) as the cached snapshot of `repo_id`: blobs
  named by their sha256, snapshot entries as relative symlinks, refs/main the commit."""
  folder = cache / ("models--" + repo_id.replace("/", "--"))
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(COMMIT)
  (folder / "blobs").mkdir()
  for name, data in files.items():
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.write_bytes(data)
    link = folder / "snapshots" / COMMIT / name
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
  return folder / "snapshots" / COMMIT


def _json(obj):
  return json.dumps(obj).encode()


@pytest.mark.parametrize("cfg,name,want", [
    (DDPM_CIFAR10_32, "google/ddpm-cifar10-32", "cifar10.py"),
    (DDPM_CIFAR10_32, "", "cifar10.py"),  # a local folder: the architecture decides
    (DDPM_CIFAR10_32_RESAVED, "", "cifar10.py"),
    (DDPM_256, "google/ddpm-church-256", "lsun_church256.py"),
    (DDPM_256, "google/ddpm-ema-church-256", "lsun_church256.py"),
    (DDPM_256, "google/ddpm-bedroom-256", "lsun_bedroom256.py"),
    (DDPM_256, "google/ddpm-cat-256", "lsun_cat256.py"),
    (DDPM_256, "google/ddpm-celebahq-256", "celebahq256.py"),
])
def test_config_from_each_published_layout(tmp_path, cfg, name, want):
  (tmp_path / "config.json").write_bytes(_json(cfg))
  (tmp_path / "scheduler_config.json").write_bytes(_json(SCHEDULER))
  config, origin = released_models.infer_config(str(tmp_path), name)
  assert origin == os.path.join("configs", want)
  unet = models.unet_config_from(config)
  assert list(unet.level_channels(i) for i in range(unet.num_resolutions)) == \
      cfg["block_out_channels"]
  assert unet.image_size == cfg["sample_size"] and config.data.image_size == unet.image_size
  assert config.diffusion.num_timesteps == 1000
  assert config.diffusion.model_var_type == "fixedlarge"


def test_config_inference_refuses_what_it_cannot_decide(tmp_path):
  (tmp_path / "config.json").write_bytes(_json(DDPM_256))
  with pytest.raises(ValueError, match="celebahq256.py.*pass --config"):
    released_models.infer_config(str(tmp_path), "")  # four 256x256 datasets share it
  (tmp_path / "config.json").write_bytes(_json(SMALL_DIFFUSERS))
  with pytest.raises(ValueError, match="matches none"):
    released_models.infer_config(str(tmp_path), "")
  (tmp_path / "config.json").write_bytes(_json(DDPM_CIFAR10_32))
  (tmp_path / "scheduler_config.json").write_bytes(
      _json(dict(SCHEDULER, beta_schedule="scaled_linear")))
  with pytest.raises(ValueError, match="scaled_linear"):
    released_models.infer_config(str(tmp_path), "")
  (tmp_path / "scheduler_config.json").write_bytes(
      _json(dict(SCHEDULER, variance_type="fixed_small", num_train_timesteps=500)))
  config, _ = released_models.infer_config(str(tmp_path), "")
  assert config.diffusion.model_var_type == "fixedsmall"
  assert config.diffusion.num_timesteps == 500


def test_hub_name_resolves_from_the_cache_offline(tmp_path):
  cache = tmp_path / "hub"
  snapshot = make_hub_cache(cache, "google/ddpm-cifar10-32", {
      "config.json": _json(DDPM_CIFAR10_32), "scheduler_config.json": _json(SCHEDULER),
      "model_index.json": _json({"_class_name": "DDPMPipeline"}),
      diffusers_weights.WEIGHTS_NAME: b"(weights are not read to resolve the source)"})
  src, config, origin = import_checkpoint.resolve_source(
      "google/ddpm-cifar10-32", None, hub_cache=str(cache), offline=True)
  assert os.path.realpath(src) == os.path.realpath(snapshot)
  assert origin == os.path.join("configs", "cifar10.py")
  assert config.data.dataset == "cifar10" and config.model.dropout == 0.1
  # The cached snapshot is used without any network access even when not offline.
  again, _, _ = import_checkpoint.resolve_source("google/ddpm-cifar10-32", None,
                                                 hub_cache=str(cache), offline=False)
  assert again == src


def test_hub_import_of_a_cached_model_end_to_end(tmp_path, small_hub_model):
  cache, params, config = small_hub_model
  src, got_config, origin = import_checkpoint.resolve_source(
      "someone/ddpm-small-16", config, hub_cache=str(cache), offline=True)
  assert origin == "--config" and got_config is config
  workdir = str(tmp_path / "workdir")
  import_checkpoint.import_checkpoint(src, workdir, config)
  loaded, step = params_checkpoint.load_eval_params(workdir, config)
  assert step == 0
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(loaded)),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_uncached_model_offline_names_the_cache_and_the_fix(tmp_path):
  cache = tmp_path / "empty_hub"
  with pytest.raises(FileNotFoundError) as info:
    released_models.fetch("google/ddpm-cat-256", str(cache), offline=True)
  message = str(info.value)
  assert str(cache) in message and "internet access" in message and "--src DIR" in message
  assert not (cache / "models--google--ddpm-cat-256").exists() or not any(
      (cache / "models--google--ddpm-cat-256").rglob("*.safetensors"))
  # The command: one line on stderr, exit status 1, before anything is written.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.tools.import_checkpoint",
       "--src=google/ddpm-cat-256", f"--workdir={tmp_path / 'w'}",
       f"--hub_cache={cache}", "--offline"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"))
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
      "error: google/ddpm-cat-256 is not in the Hugging Face cache")
  assert not (tmp_path / "w").exists()


@pytest.fixture
def small_hub_model(tmp_path):
  """A small UNet2DModel (the SMALL network, random weights) cached under a hub name."""
  params = random_params(SMALL, 3)
  export = tmp_path / "export"
  diffusers_weights.export_diffusers(params, SMALL, str(export))
  files = {name: (export / name).read_bytes() for name in os.listdir(export)}
  cache = tmp_path / "hub"
  make_hub_cache(cache, "someone/ddpm-small-16", files)
  config = config_base.shrink(config_base.get_base_config())
  config.data.image_size, config.data.channels = 16, 3
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2, 2), 2
  config.model.attn_resolutions, config.model.num_groups = (8, 4), 8
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "learned_range"
  assert models.unet_config_from(config) == SMALL
  return cache, params, config
