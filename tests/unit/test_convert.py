"""Checkpoint import (official TF, diffusers) and export (diffusers), with their checks.

The TF checkpoint is written here with the official variable names and shapes, listed by
walking the official model code (`unet_fixtures.official_variables`), never by our
exporter; its values come from a random diffusers UNet2DModel through a name mapping
written here from the official naming scheme.
"""

import dataclasses
import json
import os
import pickle

import jax
import numpy as np
import pytest
import tensorflow as tf
import torch
from unet_fixtures import DDPM_256
from unet_fixtures import DDPM_CIFAR10_32
from unet_fixtures import DDPM_CIFAR10_32_RESAVED
from unet_fixtures import load_config
from unet_fixtures import official_variables
from unet_fixtures import random_params
from unet_fixtures import SMALL
from unet_fixtures import SMALL_DIFFUSERS
from unet_fixtures import torch_unet

from diffusion_jax import models
from diffusion_jax.convert import diffusers_config
from diffusion_jax.convert import diffusers_weights
from diffusion_jax.convert import mismatch
from diffusion_jax.convert import tf_checkpoint


EMA = "/ExponentialMovingAverage"


def small_official_variables():
  c = SMALL
  return official_variables(c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions,
                            c.in_channels, c.out_channels, c.image_size)


def diffusers_name_of(tf_name, num_levels):
  """The diffusers parameter holding an official TF variable (the official naming scheme)."""
  parts = tf_name.split("/")
  assert parts[0] == "model"
  module, leaf = parts[1:-1], parts[-1]
  leaf = "bias" if leaf in ("b", "beta") else "weight"
  top = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}
  if module[0] in top:
    return f"{top[module[0]]}.{leaf}"
  if module[0] == "temb":
    return f"time_embedding.linear_{int(module[1][-1]) + 1}.{leaf}"
  layer = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm",
           "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
  if module[0] == "mid":
    block = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}
    return f"mid_block.{block[module[1]]}.{layer.get(module[2], module[2])}.{leaf}"
  side, level = module[0].split("_")
  index = int(level) if side == "down" else num_levels - 1 - int(level)
  prefix = f"{side}_blocks.{index}"
  if module[1] in ("downsample", "upsample"):
    return f"{prefix}.{module[1]}rs.0.conv.{leaf}"
  kind, j = module[1].split("_")
  kind = {"block": "resnets", "attn": "attentions"}[kind]
  return f"{prefix}.{kind}.{j}.{layer.get(module[2], module[2])}.{leaf}"


def to_tf_layout(name, value):
  """A diffusers tensor in the official layout: conv HWIO, dense and nin [in, out]."""
  if value.ndim == 4 and value.shape[2:] == (1, 1):
    return value[:, :, 0, 0].T  # 1x1 conv shortcut -> nin
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def write_tf_checkpoint(prefix, tensors):
  """A TF V2 checkpoint holding exactly `tensors` ({name: array})."""
  names = list(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return prefix


@pytest.fixture(scope="module")
def small_weights():
  """(diffusers state dict, official raw TF variables) of one random small network."""
  model = torch_unet(SMALL_DIFFUSERS, seed=7)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  official = {}
  used = set()
  for name, shape in small_official_variables():
    source = diffusers_name_of(name, len(SMALL.ch_mult))
    official[name] = np.ascontiguousarray(to_tf_layout(name, state_dict[source]))
    assert official[name].shape == shape, name  # The official shapes fit diffusers'.
    used.add(source)
  assert used == set(state_dict)  # The two namings are in one-to-one correspondence.
  return state_dict, official


def assert_trees_equal(a, b):
  fa, fb = mismatch.flatten_params(a), mismatch.flatten_params(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


# --- Official TensorFlow checkpoints ------------------------------------------------------


def test_tf_checkpoint_import_uses_every_variable_and_equals_the_diffusers_import(
    small_weights, tmp_path):
  state_dict, official = small_weights
  ema = {name: value * 0.5 + 0.25 for name, value in official.items()}
  tensors = dict(official)
  tensors.update({name + EMA: value for name, value in ema.items()})
  # What else an official training checkpoint holds: step, Adam slots and powers.
  tensors["global_step"] = np.array(4321, np.int64)
  tensors["beta1_power"] = np.array(0.9, np.float32)
  for name in ("model/conv_in/W", "model/mid/attn_1/q/b"):
    tensors[name + "/Adam"] = np.zeros_like(official[name])
    tensors[name + "/Adam_1"] = np.zeros_like(official[name])
  prefix = write_tf_checkpoint(str(tmp_path / "model.ckpt-4321"), tensors)

  raw, step = tf_checkpoint.load_tf_checkpoint(prefix, SMALL, use_ema=False)
  assert step == 4321
  from_diffusers = diffusers_weights.params_from_state_dict(state_dict, SMALL)
  assert_trees_equal(raw, from_diffusers)
  assert models.count_params(raw) == sum(v.size for v in official.values())

  ema_params, _ = tf_checkpoint.load_tf_checkpoint(prefix, SMALL, use_ema=True)
  ema_state_dict = {k: v * 0.5 + 0.25 for k, v in state_dict.items()}
  assert_trees_equal(ema_params, diffusers_weights.params_from_state_dict(ema_state_dict,
                                                                          SMALL))
  # Every parameter is float32 NumPy in the layout of our model.
  shapes = mismatch.flatten_params(models.param_shapes(SMALL))
  for key, value in mismatch.flatten_params(ema_params).items():
    assert value.dtype == np.float32 and value.shape == shapes[key].shape


def test_tf_import_names_the_mismatching_variables(small_weights, tmp_path):
  _, official = small_weights

  def load(tensors, **kwargs):
    prefix = write_tf_checkpoint(str(tmp_path / f"ckpt{len(os.listdir(tmp_path))}"),
                                 tensors)
    return tf_checkpoint.load_tf_checkpoint(prefix, SMALL, **kwargs)

  wrong = dict(official)
  wrong["model/temb/dense0/W"] = np.zeros((32, 64), np.float32)  # Model: (32, 128).
  with pytest.raises(mismatch.CheckpointMismatchError,
                     match=r"model/temb/dense0/W: checkpoint \(32, 64\) vs model \(32, 128\)"):
    load(wrong, use_ema=False)

  missing = {k: v for k, v in official.items() if k != "model/mid/attn_1/k/b"}
  with pytest.raises(mismatch.CheckpointMismatchError,
                     match=r"1 variable\(s\) missing.*model/mid/attn_1/k/b \(64,\)"):
    load(missing, use_ema=False)

  extra = dict(official)
  extra["model/down_0/block_0/conv3/W"] = np.zeros((3, 3, 32, 32), np.float32)
  with pytest.raises(mismatch.CheckpointMismatchError,
                     match=r"unused by the model: model/down_0/block_0/conv3/W"):
    load(extra, use_ema=False)

  # Only raw weights in the file: asking for the EMA ones says to use --raw.
  with pytest.raises(mismatch.CheckpointMismatchError, match=r"use --raw"):
    load(official, use_ema=True)

  # The checkpoint of another architecture (one res block per level instead of two).
  other = dataclasses.replace(SMALL, num_res_blocks=1)
  with pytest.raises(mismatch.CheckpointMismatchError, match="down_0/block_1"):
    tf_checkpoint.load_tf_checkpoint(
        write_tf_checkpoint(str(tmp_path / "full"), official), other, use_ema=False)


# --- diffusers format ------------------------------------------------------------------


def test_released_diffusers_configs_are_the_paper_models():
  def architecture(unet_config):
    return dataclasses.replace(unet_config, dropout=0.0, dtype="float32")
  cifar = architecture(models.unet_config_from(load_config("cifar10.py")))
  assert architecture(diffusers_config.unet_config_from_diffusers(DDPM_CIFAR10_32)) == cifar
  assert architecture(
      diffusers_config.unet_config_from_diffusers(DDPM_CIFAR10_32_RESAVED)) == cifar
  big = diffusers_config.unet_config_from_diffusers(DDPM_256)
  for name in ("celebahq256.py", "lsun_church256.py", "lsun_bedroom256.py",
               "lsun_cat256.py"):
    assert architecture(models.unet_config_from(load_config(name))) == architecture(big)
  # diffusers' own count of the 256x256 network equals ours.
  import diffusers  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    model = diffusers.UNet2DModel.from_config(DDPM_256)
  assert sum(p.numel() for p in model.parameters()) == 113_673_219
  assert models.count_params(big) == 113_673_219


def test_other_diffusers_networks_are_rejected_naming_the_keys():
  bad = dict(DDPM_CIFAR10_32, flip_sin_to_cos=True, attention_head_dim=8,
             downsample_padding=1)
  del bad["norm_eps"]
  with pytest.raises(ValueError) as info:
    diffusers_config.unet_config_from_diffusers(bad)
  for key in ("flip_sin_to_cos", "attention_head_dim", "downsample_padding", "norm_eps"):
    assert key in str(info.value)
  mirrored = dict(DDPM_CIFAR10_32, up_block_types=["UpBlock2D"] * 4)
  with pytest.raises(ValueError, match=r"up_block_types\[2\]"):
    diffusers_config.unet_config_from_diffusers(mirrored)
  with pytest.raises(ValueError, match="cannot be exported"):
    diffusers_config.diffusers_config_from(dataclasses.replace(SMALL, resamp_with_conv=False))


def test_export_then_import_is_the_identity(tmp_path):
  params = random_params(SMALL, seed=0)
  out = str(tmp_path / "export")
  diffusers_weights.export_diffusers(params, SMALL, out)
  assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
  loaded, unet_config = diffusers_weights.load_diffusers(out)
  assert_trees_equal(loaded, params)
  assert unet_config == SMALL
  with open(os.path.join(out, "config.json")) as f:
    assert diffusers_config.unet_config_from_diffusers(json.load(f)) == SMALL
  # Existing files are never replaced silently.
  before = open(os.path.join(out, "diffusion_pytorch_model.safetensors"), "rb").read()
  with pytest.raises(FileExistsError, match="overwrite"):
    diffusers_weights.export_diffusers(jax.tree_util.tree_map(np.zeros_like, params),
                                       SMALL, out)
  assert open(os.path.join(out, "diffusion_pytorch_model.safetensors"), "rb").read() == before


def test_diffusers_import_names_the_mismatches(small_weights, tmp_path):
  state_dict, _ = small_weights
  other = dataclasses.replace(SMALL, ch_mult=(1, 2, 4))
  with pytest.raises(mismatch.CheckpointMismatchError,
                     match=r"down_blocks.2.resnets.0.conv1.weight: checkpoint "
                           r"\(64, 64, 3, 3\) vs model \(128, 64, 3, 3\)"):
    diffusers_weights.params_from_state_dict(state_dict, other)
  # A model directory whose config.json describes another network than the configured one.
  out = str(tmp_path / "model")
  diffusers_weights.export_diffusers(
      diffusers_weights.params_from_state_dict(state_dict, SMALL), SMALL, out)
  with pytest.raises(mismatch.CheckpointMismatchError, match=r"ch_mult: checkpoint"):
    diffusers_weights.load_diffusers(out, other)
  # Exporting parameters that do not fit the architecture writes nothing.
  params = diffusers_weights.params_from_state_dict(state_dict, SMALL)
  with pytest.raises(mismatch.CheckpointMismatchError, match="missing"):
    diffusers_weights.export_diffusers(params, other, str(tmp_path / "not_written"))
  assert not os.path.exists(tmp_path / "not_written")


def test_older_attention_names_are_accepted(small_weights):
  state_dict, _ = small_weights
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for name, value in state_dict.items():
    for new, old in legacy_names.items():
      name = name.replace(f".{new}.", f".{old}.")
    legacy[name] = value
  assert any(".proj_attn." in n for n in legacy)
  assert_trees_equal(diffusers_weights.params_from_state_dict(legacy, SMALL),
                     diffusers_weights.params_from_state_dict(state_dict, SMALL))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_torch_files_load_with_weights_only_and_never_run_code(small_weights, tmp_path):
  state_dict, _ = small_weights
  good = str(tmp_path / "diffusion_pytorch_model.bin")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, good)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(SMALL_DIFFUSERS, f)
  params, unet_config = diffusers_weights.load_diffusers(str(tmp_path))
  assert unet_config == SMALL
  assert_trees_equal(params, diffusers_weights.params_from_state_dict(state_dict, SMALL))

  marker = tmp_path / "code_ran"

  class Payload:
    def __reduce__(self):
      return (open, (str(marker), "w"))

  evil = str(tmp_path / "evil.bin")
  torch.save({"conv_in.weight": torch.zeros(1), "payload": Payload()}, evil)
  with pytest.raises(pickle.UnpicklingError):
    diffusers_weights.read_state_dict(evil)
  plain = str(tmp_path / "plain.pt")
  with open(plain, "wb") as f:
    pickle.dump({"payload": Payload()}, f)
  with pytest.raises(pickle.UnpicklingError):
    diffusers_weights.read_state_dict(plain)
  assert not marker.exists()
  with pytest.raises(ValueError, match="Unknown weights file type"):
    diffusers_weights.read_state_dict(str(tmp_path / "weights.pkl"))


# --- The import and export commands ------------------------------------------------------


def small_experiment_config():
  """An experiment config whose U-Net is SMALL (learned variances: 6 output channels)."""
  from diffusion_jax import config_base  # pylint: disable=g-import-not-at-top
  config = config_base.shrink(config_base.get_base_config())
  config.data.image_size, config.data.channels = 16, 3
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2, 2), 2
  config.model.attn_resolutions, config.model.num_groups = (8, 4), 8
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "learned_range"
  assert models.unet_config_from(config) == SMALL
  return config


def test_import_tool_checks_everything_before_writing(small_weights, tmp_path):
  from diffusion_jax.tools import import_checkpoint  # pylint: disable=g-import-not-at-top
  state_dict, official = small_weights
  prefix = write_tf_checkpoint(str(tmp_path / "model.ckpt-5"), official)
  hf_dir = str(tmp_path / "hf")
  diffusers_weights.export_diffusers(
      diffusers_weights.params_from_state_dict(state_dict, SMALL), SMALL, hf_dir)
  config = small_experiment_config()
  config.model.num_res_blocks = 1  # Not the checkpoints' architecture.
  workdir = tmp_path / "workdir"
  with pytest.raises(mismatch.CheckpointMismatchError, match="unused by the model: model/down_0/block_1/conv1/W"):
    import_checkpoint.import_checkpoint(prefix, str(workdir), config, use_ema=False)
  with pytest.raises(mismatch.CheckpointMismatchError, match="num_res_blocks: checkpoint 2"):
    import_checkpoint.import_checkpoint(hf_dir, str(workdir), config)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="neither a TensorFlow checkpoint"):
    import_checkpoint.import_checkpoint(str(tmp_path / "empty"), str(workdir), config)
  assert not workdir.exists()  # Nothing was written.
  # The right config reads both sources to the same weights (TF --raw here).
  config = small_experiment_config()
  from_tf, step = import_checkpoint.load_released_weights(prefix, config, use_ema=False)
  from_hf, _ = import_checkpoint.load_released_weights(hf_dir, config)
  assert step == 0  # No global_step in this file.
  assert_trees_equal(from_tf, from_hf)


SMALL_CONFIG_FILE = '''
from diffusion_jax import config_base


def get_config():
  config = config_base.shrink(config_base.get_base_config())
  config.data.image_size, config.data.channels = 16, 3
  config.model.ch, config.model.ch_mult, config.model.num_res_blocks = 32, (1, 2, 2), 2
  config.model.attn_resolutions, config.model.num_groups = (8, 4), 8
  config.model.dropout = 0.0
  config.diffusion.model_var_type = "learned_range"
  return config
'''


def test_import_and_export_commands_round_trip(small_weights, tmp_path):
  from diffusion_jax.training import params_checkpoint  # pylint: disable=g-import-not-at-top
  from diffusion_jax.tools import export_diffusers  # pylint: disable=g-import-not-at-top
  from diffusion_jax.tools import import_checkpoint  # pylint: disable=g-import-not-at-top
  state_dict, official = small_weights
  tensors = dict(official)
  tensors.update({name + EMA: value + 1.0 for name, value in official.items()})
  tensors["global_step"] = np.array(77, np.int64)
  prefix = write_tf_checkpoint(str(tmp_path / "model.ckpt-77"), tensors)
  config = small_experiment_config()
  workdir = str(tmp_path / "imported")
  import_checkpoint.import_checkpoint(prefix, workdir, config, use_ema=True)
  ema, _ = tf_checkpoint.load_tf_checkpoint(prefix, SMALL, use_ema=True)
  # The imported weights are both the parameters and the EMA parameters.
  params, step = params_checkpoint.load_eval_params(workdir, config, use_ema=False)
  assert step == 77
  assert_trees_equal(jax.device_get(params), ema)
  # A workdir that holds checkpoints is never overwritten.
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    import_checkpoint.import_checkpoint(prefix, workdir, config)

  out = str(tmp_path / "exported")
  export_diffusers.export_workdir(workdir, out)  # EMA parameters, the saved config.
  assert_trees_equal(diffusers_weights.load_diffusers(out, SMALL)[0], ema)

  # The command line, on the diffusers weights just exported.
  config_file = tmp_path / "small_config.py"
  config_file.write_text(SMALL_CONFIG_FILE)
  second = str(tmp_path / "from_diffusers")
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.tools.import_checkpoint", f"--src={out}",
       f"--workdir={second}", f"--config={config_file}"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  params, step = params_checkpoint.load_eval_params(second, config)
  assert step == 0
  assert_trees_equal(jax.device_get(params), ema)
  # And the export command on that workdir (its saved config).
  third = str(tmp_path / "exported_again")
  result = subprocess.run(
      [sys.executable, "-m", "diffusion_jax.tools.export_diffusers", f"--workdir={second}",
       f"--out={third}"],
      cwd=root, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert_trees_equal(diffusers_weights.load_diffusers(third, SMALL)[0], ema)


@pytest.mark.parametrize("config_file", ["cifar10.py", "celebahq256.py"])
def test_official_names_and_shapes_of_the_paper_models(config_file):
  """Our parameters <-> the official graph's variables, for the paper's two networks
  (shapes only, through jax.eval_shape: nothing is allocated or compiled)."""
  c = models.unet_config_from(load_config(config_file))
  official = dict(official_variables(c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions,
                                     c.in_channels, c.out_channels, c.image_size))
  ours = {name: shape for name, shape in tf_checkpoint.tf_variables(c).values()}
  assert ours == official
  assert sum(int(np.prod(s)) for s in official.values()) == models.count_params(c)
