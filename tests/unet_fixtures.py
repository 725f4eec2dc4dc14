"""Shared test material for the U-Net tests: configs, published diffusers configs, and the
official TF variable list written out independently from the official code's structure."""

import functools
import importlib.util
import os

import flax.traverse_util
import jax
import numpy as np

from diffusion_jax import models
from diffusion_jax.models import UNet
from diffusion_jax.ops import XLA
from diffusion_jax.models import UNetConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small network with attention at two levels, nin shortcuts (channel changes and every
# up-path concatenation), two down- and two upsamplings, and learned-variance outputs.
SMALL = UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 4),
                   dropout=0.0, num_groups=8, image_size=16, in_channels=3, out_channels=6)
# The same network as a diffusers UNet2DModel config, written by hand.
SMALL_DIFFUSERS = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "out_channels": 6, "layers_per_block": 2, "norm_eps": 1e-06, "norm_num_groups": 8,
    "sample_size": 16, "time_embedding_type": "positional",
}

# The published config.json of google/ddpm-cifar10-32 (the official CIFAR10 model).
DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
# The same model as re-saved by a recent diffusers (every key spelled out).
DDPM_CIFAR10_32_RESAVED = dict(
    DDPM_CIFAR10_32, _diffusers_version="0.24.0", add_attention=True,
    attn_norm_num_groups=None, class_embed_type=None, downsample_type="conv", dropout=0.0,
    num_class_embeds=None, num_train_timesteps=None, resnet_time_scale_shift="default",
    upsample_type="conv")
# The published config.json of google/ddpm-cat-256; ddpm-celebahq-256, ddpm-church-256 and
# ddpm-bedroom-256 are the same network (the paper's 256x256 model).
DDPM_256 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D",
                         "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
                       "UpBlock2D"],
}


@functools.partial(jax.jit, static_argnums=0)
def apply_eval(unet_config, params, x, t):
  """The U-Net in eval mode, compiled once per config and shapes for the whole session."""
  return UNet(unet_config).apply({"params": params}, x, t, train=False)


def random_params(unet_config, seed):
  """Random float32 parameters (no near-zero layers), so every path shapes the output."""
  shapes = flax.traverse_util.flatten_dict(models.param_shapes(unet_config))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in shapes.items():
    shape = shape.shape
    if path[-1] == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    elif path[-1] == "scale":
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = 0.2 * rng.standard_normal(shape)
    flat[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def load_config(name):
  """An experiment config from configs/<name>."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def torch_unet(config_json, seed):
  """A diffusers UNet2DModel with every parameter random (norm scales around 1)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = diffusers.UNet2DModel.from_config(config_json).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=generator))
      else:
        p.copy_(torch.randn(p.shape, generator=generator) / np.sqrt(p[0].numel()))
  return model


def small_unet_against_diffusers(seed, ops=XLA):
  """SMALL at batch 3 through diffusers and through ours with `ops` (default the pure-JAX
  operations): (want, got, our lowered text).

  Ours is a fresh jit of the model (unlike `apply_eval`, whose first trace per shape is
  kept for the session).
  """
  import torch  # pylint: disable=g-import-not-at-top
  from diffusion_jax.convert import diffusers_weights  # pylint: disable=g-import-not-at-top
  model = torch_unet(SMALL_DIFFUSERS, seed=seed)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  params = diffusers_weights.params_from_state_dict(state_dict, SMALL)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, SMALL.image_size, SMALL.image_size, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=3).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 torch.from_numpy(t).long()).sample.numpy().transpose(0, 2, 3, 1)
  apply = jax.jit(lambda p, x, t: UNet(SMALL, ops=ops).apply({"params": p}, x, t,
                                                              train=False))
  return want, np.asarray(apply(params, x, t)), apply.lower(params, x, t).as_text()


def small_unet_parameter_gradients(seed, backends):
  """The gradient of a loss of SMALL's output (batch 3) w.r.t. random parameters, once
  with each of `backends` (name -> `Ops`): name -> gradient tree."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params = random_params(SMALL, seed=seed)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, SMALL.image_size, SMALL.image_size, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=3).astype(np.int32)

  def loss(p, ops):
    out = UNet(SMALL, ops=ops).apply({"params": p}, x, t, train=False)
    return jnp.mean(jnp.sin(3.0 * out))

  return {name: jax.jit(jax.grad(lambda p, ops=ops: loss(p, ops)))(params)
          for name, ops in backends.items()}


def assert_gradients_close(got, want):
  """Per leaf, relative to its own size; leaves whose gradient is zero in exact arithmetic
  (the attention's key bias: softmax ignores a constant logit shift) are rounding noise,
  held to a millionth of the whole gradient instead."""
  leaves = jax.tree.leaves(want)
  total = np.sqrt(sum(np.sum(np.square(np.asarray(w, np.float64))) for w in leaves))
  assert total > 1e-3
  assert jax.tree.structure(got) == jax.tree.structure(want)
  flat = jax.tree_util.tree_leaves_with_path(got)
  for (path, a), b in zip(flat, leaves):
    error = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    bound = 1e-4 * np.linalg.norm(np.asarray(b, np.float64)) + 1e-6 * total
    assert error <= bound, (jax.tree_util.keystr(path), error, bound)


def official_variables(ch, ch_mult, num_res_blocks, attn_resolutions, in_ch, out_ch,
                       image_size, resamp_with_conv=True):
  """[(name, shape)] of the official TF graph, walking `diffusion_tf/models/unet.py`.

  Scope `model`; dense/nin W [in, out], conv W [3, 3, in, out], biases b, group norms
  gamma/beta.
  """
  out = []

  def dense(scope, n_in, n_out):
    out.extend([(f"{scope}/W", (n_in, n_out)), (f"{scope}/b", (n_out,))])

  def conv(scope, n_in, n_out):
    out.extend([(f"{scope}/W", (3, 3, n_in, n_out)), (f"{scope}/b", (n_out,))])

  def norm(scope, c):
    out.extend([(f"{scope}/gamma", (c,)), (f"{scope}/beta", (c,))])

  def resnet_block(scope, c_in, c_out):
    norm(f"{scope}/norm1", c_in)
    conv(f"{scope}/conv1", c_in, c_out)
    dense(f"{scope}/temb_proj", 4 * ch, c_out)
    norm(f"{scope}/norm2", c_out)
    conv(f"{scope}/conv2", c_out, c_out)
    if c_in != c_out:
      dense(f"{scope}/nin_shortcut", c_in, c_out)
    return c_out

  def attn_block(scope, c):
    norm(f"{scope}/norm", c)
    for name in ("q", "k", "v", "proj_out"):
      dense(f"{scope}/{name}", c, c)

  dense("model/temb/dense0", ch, 4 * ch)
  dense("model/temb/dense1", 4 * ch, 4 * ch)
  conv("model/conv_in", in_ch, ch)
  hs = [ch]
  size = image_size
  for i, mult in enumerate(ch_mult):
    for j in range(num_res_blocks):
      h = resnet_block(f"model/down_{i}/block_{j}", hs[-1], ch * mult)
      if size in attn_resolutions:
        attn_block(f"model/down_{i}/attn_{j}", h)
      hs.append(h)
    if i != len(ch_mult) - 1:
      if resamp_with_conv:
        conv(f"model/down_{i}/downsample/conv", hs[-1], hs[-1])
      hs.append(hs[-1])
      size //= 2
  h = resnet_block("model/mid/block_1", hs[-1], hs[-1])
  attn_block("model/mid/attn_1", h)
  h = resnet_block("model/mid/block_2", h, h)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      h = resnet_block(f"model/up_{i}/block_{j}", h + hs.pop(), ch * ch_mult[i])
      if size in attn_resolutions:
        attn_block(f"model/up_{i}/attn_{j}", h)
    if i != 0:
      if resamp_with_conv:
        conv(f"model/up_{i}/upsample/conv", h, h)
      size *= 2
  assert not hs
  norm("model/norm_out", h)
  conv("model/conv_out", h, out_ch)
  return out
