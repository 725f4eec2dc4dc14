"""Output parity with diffusers' UNet2DModel, the PyTorch port of the official network.

Random weights are set in the PyTorch model, converted by our importer, and both networks
run on the same random x and t in eval mode (no dropout). diffusers' UNet2DModel has no
setting for the pooling / plain-nearest resampling (resamp_with_conv=False): for that path
its down/upsamplers are replaced by diffusers' own `Downsample2D(use_conv=False)` (2x2
average pooling) and `Upsample2D(use_conv=False)` (nearest x2) layers.
"""

import dataclasses
import json

import diffusers
import jax
import numpy as np
import torch
from unet_fixtures import apply_eval
from unet_fixtures import DDPM_CIFAR10_32
from unet_fixtures import load_config
from unet_fixtures import random_params
from unet_fixtures import SMALL
from unet_fixtures import SMALL_DIFFUSERS
from unet_fixtures import torch_unet

from diffusion_jax import models
from diffusion_jax.convert import diffusers_weights
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D


def compare(model, unet_config, batch, seed):
  """Relative L2 error of our network (weights imported from `model`) vs `model`."""
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  params = diffusers_weights.params_from_state_dict(state_dict, unet_config)
  rng = np.random.default_rng(seed)
  size = unet_config.image_size
  x = rng.standard_normal((batch, size, size, unet_config.in_channels)).astype(np.float32)
  t = rng.integers(0, 1000, size=batch).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 torch.from_numpy(t).long()).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(apply_eval(unet_config, params, x, t))
  assert got.shape == want.shape
  assert np.linalg.norm(want) > 0.1 * np.sqrt(want.size)  # A non-trivial output.
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def test_cifar10_model_matches_diffusers():
  model = torch_unet(DDPM_CIFAR10_32, seed=0)
  # diffusers' own count of the official CIFAR10 network.
  assert sum(p.numel() for p in model.parameters()) == 35_746_307
  unet_config = dataclasses.replace(models.unet_config_from(load_config("cifar10.py")),
                                    dropout=0.0)
  assert compare(model, unet_config, batch=2, seed=0) <= 1e-5


def test_small_model_with_conv_resampling_matches_diffusers():
  model = torch_unet(SMALL_DIFFUSERS, seed=1)
  assert compare(model, SMALL, batch=2, seed=1) <= 1e-5


def test_small_model_with_pooling_resampling_matches_diffusers_layers():
  model = torch_unet(SMALL_DIFFUSERS, seed=2)
  channels = SMALL_DIFFUSERS["block_out_channels"]
  for block, c in zip(model.down_blocks[:-1], channels[:-1]):
    block.downsamplers[0] = Downsample2D(c, use_conv=False)  # 2x2 average pooling
  for block, c in zip(model.up_blocks[:-1], channels[::-1][:-1]):
    block.upsamplers[0] = Upsample2D(c, use_conv=False)  # nearest x2, no conv
  pooled = dataclasses.replace(SMALL, resamp_with_conv=False)
  assert compare(model, pooled, batch=2, seed=2) <= 1e-5


def test_exported_model_loads_in_diffusers_and_computes_the_same(tmp_path):
  params = random_params(SMALL, seed=3)
  rng = np.random.default_rng(3)
  diffusers_weights.export_diffusers(params, SMALL, str(tmp_path))
  model = diffusers.UNet2DModel.from_pretrained(str(tmp_path)).eval()
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  t = np.array([5, 640], np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 torch.from_numpy(t).long()).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(apply_eval(SMALL, params, x, t))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5


# --- class conditioning ---------------------------------------------------------------

COND = dataclasses.replace(SMALL, num_classes=5)
COND_DIFFUSERS = dict(SMALL_DIFFUSERS, num_class_embeds=6)  # 5 classes + the null class


def test_class_conditional_model_matches_diffusers_num_class_embeds():
  model = torch_unet(COND_DIFFUSERS, seed=4)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  assert state_dict["class_embedding.weight"].shape == (6, 128)
  params = diffusers_weights.params_from_state_dict(state_dict, COND)
  np.testing.assert_array_equal(params["class_embed"], state_dict["class_embedding.weight"])
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
  t = np.array([3, 400, 999], np.int32)
  y = np.array([0, 4, 5], np.int32)  # Two classes and the null class.
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
                 class_labels=torch.from_numpy(y).long()).sample.numpy().transpose(0, 2, 3, 1)
  got = np.asarray(jax.jit(lambda p, x, t, y: models.UNet(COND).apply(
      {"params": p}, x, t, train=False, y=y))(params, x, t, y))
  assert np.linalg.norm(want) > 0.1 * np.sqrt(want.size)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
  # The labels matter: another label changes the output.
  other = np.asarray(jax.jit(lambda p, x, t, y: models.UNet(COND).apply(
      {"params": p}, x, t, train=False, y=y))(params, x, t, (y + 1) % 6))
  assert np.linalg.norm(other - want) > 1e-3 * np.linalg.norm(want)


def test_class_conditional_export_and_reimport_is_the_identity(tmp_path):
  params = random_params(COND, seed=5)
  diffusers_weights.export_diffusers(params, COND, str(tmp_path))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["num_class_embeds"] == 6
  back, found = diffusers_weights.load_diffusers(str(tmp_path))
  assert found == dataclasses.replace(COND, dropout=found.dropout)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_unconditional_parameter_counts_are_unchanged():
  assert models.count_params(models.unet_config_from(load_config("cifar10.py"))) == 35_746_307
  assert models.count_params(
      models.unet_config_from(load_config("celebahq256.py"))) == 113_673_219
  assert "class_embed" not in models.param_shapes(SMALL)
