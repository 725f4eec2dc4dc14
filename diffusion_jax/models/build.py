"""The U-Net's config from an experiment configuration; parameter initialization, shapes,
paths and counts (none of which depends on the operations backend)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.models.unet import UNet, UNetConfig

Params = Any  # A nested dict of arrays: the 'params' collection of `UNet`.

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def unet_config_from(config: ml_collections.ConfigDict) -> UNetConfig:
  """The `UNetConfig` of an experiment configuration.

  Args:
    config: the experiment configuration (sections `model`, `data`, `diffusion`).

  Returns:
    The model config: image channels and size from `config.data`; twice the image
    channels as output when `config.diffusion.model_var_type` is learned or learned_range.
  """
  m = config.model
  channels = int(config.data.channels)
  learned = config.diffusion.model_var_type in LEARNED_VARIANCE_TYPES
  return UNetConfig(
      ch=int(m.ch),
      ch_mult=tuple(m.ch_mult),
      num_res_blocks=int(m.num_res_blocks),
      attn_resolutions=tuple(m.attn_resolutions),
      dropout=float(m.dropout),
      resamp_with_conv=bool(m.resamp_with_conv),
      in_channels=channels,
      out_channels=2 * channels if learned else channels,
      num_groups=int(m.num_groups),
      image_size=int(config.data.image_size),
      dtype=str(m.dtype),
      remat=bool(m.get("remat", False)),
      num_classes=int(m.get("num_classes", 0)),
  )


def _dummy_inputs(unet_config: UNetConfig):
  """(x [1, S, S, C], t [1], y [1] or None) for tracing the network."""
  size = unet_config.image_size
  x = jnp.zeros((1, size, size, unet_config.in_channels), jnp.float32)  # [1, H, W, C]
  t = jnp.zeros((1,), jnp.int32)  # [1]
  y = jnp.zeros((1,), jnp.int32) if unet_config.num_classes else None  # [1]
  return x, t, y


def init_params(unet_config: UNetConfig, rng: jax.Array) -> Params:
  """Official initialization of the U-Net parameters (float32): `UNet.init`, compiled.

  Kernels from the official `default_init` (fan-avg uniform variance scaling), biases 0,
  GroupNorm scales 1. A deterministic function of `rng` and the architecture (the fields
  of `unet_config` that do not change the parameters play no part).

  Args:
    unet_config: the architecture.
    rng: a PRNG key.

  Returns:
    The 'params' collection (a nested dict of float32 arrays).
  """
  return _init_fn(_weights_only(unet_config))(rng)


@functools.lru_cache(maxsize=16)
def _init_fn(unet_config: UNetConfig):
  model = UNet(unet_config)
  x, t, y = _dummy_inputs(unet_config)
  # The forward pass is dead code here (only parameters are returned).
  return jax.jit(lambda rng: model.init({"params": rng}, x, t, train=False, y=y)["params"])


def param_shapes(unet_config: UNetConfig) -> Params:
  """The parameter tree as `jax.ShapeDtypeStruct` leaves, via `jax.eval_shape` (no compile)."""
  return jax.tree_util.tree_map(lambda s: s, _param_shapes(_weights_only(unet_config)))


def _weights_only(unet_config: UNetConfig) -> UNetConfig:
  """The config with the fields that do not change the parameters set to defaults."""
  return dataclasses.replace(unet_config, dropout=0.0, dtype="float32", remat=False)


@functools.lru_cache(maxsize=32)
def _param_shapes(unet_config: UNetConfig) -> Params:
  model = UNet(unet_config)
  x, t, y = _dummy_inputs(unet_config)
  return jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, x, t, train=False, y=y)["params"])


_LAYER_ORDER = ("dense0", "dense1", "norm1", "conv1", "temb_proj", "norm2", "conv2",
                "nin_shortcut", "norm", "q", "k", "v", "proj_out", "conv")
_LEAF_ORDER = ("kernel", "scale", "bias")


def _forward_order(path: tuple[str, ...], num_levels: int) -> tuple:
  """Sort key putting parameter paths in the order the forward pass uses them."""
  head = path[0]
  if head == "class_embed":  # a parameter of the UNet itself: after the time embedding
    return (0, 1), (), 0
  if head.startswith("down_"):
    top = (2, int(head[len("down_"):]))
  elif head.startswith("up_"):
    top = (4, num_levels - 1 - int(head[len("up_"):]))
  else:
    top = ({"temb": 0, "conv_in": 1, "mid": 3, "norm_out": 5, "conv_out": 6}[head], 0)
  inner = []
  for part in path[1:-1]:
    kind, _, index = part.rpartition("_")
    if kind in ("block", "attn"):  # block_j, then attn_j; downsample/upsample last.
      inner.append((int(index), kind == "attn", 0))
    elif part in ("downsample", "upsample"):
      inner.append((1 << 30, 0, 0))
    else:
      inner.append((-1, 0, _LAYER_ORDER.index(part)))
  return top, tuple(inner), _LEAF_ORDER.index(path[-1])


def param_paths(unet_config: UNetConfig) -> list[tuple[str, ...]]:
  """The parameter paths, e.g. ('down_0', 'block_0', 'conv1', 'kernel'), in forward order."""
  return list(_param_paths(_weights_only(unet_config)))


@functools.lru_cache(maxsize=32)
def _param_paths(unet_config: UNetConfig) -> tuple[tuple[str, ...], ...]:
  paths = flax.traverse_util.flatten_dict(_param_shapes(unet_config)).keys()
  return tuple(sorted(paths, key=lambda p: _forward_order(p, unet_config.num_resolutions)))


def count_params(unet_config_or_params: UNetConfig | Params) -> int:
  """Number of scalar parameters of a config (via `param_shapes`) or of a parameter tree."""
  tree = unet_config_or_params
  if isinstance(tree, UNetConfig):
    tree = param_shapes(tree)
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree)))
