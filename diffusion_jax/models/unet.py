"""The official DDPM U-Net (Ho et al. 2020; `diffusion_tf/models/unet.py`), NHWC, Flax Linen.

Module names mirror the official variable scopes: the official TF variable
`model/down_1/attn_0/q/W` is the Flax parameter `params['down_1']['attn_0']['q']['kernel']`
(`W` -> `kernel`, `b` -> `bias`, `gamma` -> `scale`, `beta` -> `bias`), with the same shape.

Usage:
  model = UNet(config)                     # the pure-JAX operations (`ops.XLA`)
  model = UNet(config, ops=ops.from_config(experiment_config, mesh))  # the kernel policy's
  out = model.apply({'params': params}, x, t, train=True, rngs={'dropout': key})

The network is the architecture only: its convolutions, GroupNorm(+swish) and dropout go
through the `ops` attribute (see `diffusion_jax.ops`), which does not change the
parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import ops as ops_lib
from diffusion_jax.models import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the official U-Net.

  Attributes:
    ch: base channels (128 in the paper).
    ch_mult: channel multiplier per resolution level; level i has ch * ch_mult[i] channels
      and resolution image_size / 2**i.
    num_res_blocks: res blocks per level in the down path (the up path has one more).
    attn_resolutions: resolutions (side lengths) whose res blocks are followed by attention.
    dropout: dropout rate inside res blocks (train mode).
    resamp_with_conv: conv resampling (True) or average pooling / plain nearest (False).
    in_channels: image channels.
    out_channels: output channels (2 * in_channels for learned variances).
    num_groups: GroupNorm groups (must divide every normalized channel count).
    image_size: input height = width.
    dtype: compute dtype name, "float32" or "bfloat16" (parameters are always float32).
    remat: rematerialize every res block and attention block in the backward pass
      (`flax.linen.remat`): only the blocks' inputs are kept from the forward pass, the
      rest is recomputed. Same parameters and values; less activation memory for about
      one more forward of compute per step. For the 256x256 networks on small devices
      (GPU, TPU: XLA:CPU merges the recomputation back into the forward pass).
    num_classes: 0 for the unconditional network (the paper's); N > 0 adds a learned
      class embedding of N + 1 rows (classes 0..N-1 and the null class N, used for
      classifier-free guidance) to the time embedding, as the improved-DDPM / ADM
      networks and diffusers' `UNet2DModel(num_class_embeds=N + 1)` do.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  resamp_with_conv: bool = True
  in_channels: int = 3
  out_channels: int = 3
  num_groups: int = 32
  image_size: int = 32
  dtype: str = "float32"
  remat: bool = False
  num_classes: int = 0

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    dtype = self.dtype if isinstance(self.dtype, str) else jnp.dtype(self.dtype).name
    object.__setattr__(self, "dtype", dtype)
    _validate(self)

  @property
  def num_resolutions(self) -> int:
    return len(self.ch_mult)

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Side length of the feature maps at each level."""
    return tuple(self.image_size // 2**i for i in range(self.num_resolutions))

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(_DTYPES[self.dtype])

  def level_channels(self, level: int) -> int:
    return self.ch * self.ch_mult[level]


def _validate(c: UNetConfig) -> None:
  """Raises ValueError naming the offending field and how to fix it."""
  def fail(msg):
    raise ValueError(f"Invalid UNetConfig: {msg}")
  if c.dtype not in _DTYPES:
    fail(f"dtype={c.dtype!r}; use one of {sorted(_DTYPES)}.")
  for field in ("ch", "num_res_blocks", "in_channels", "out_channels", "num_groups",
                "image_size"):
    if int(getattr(c, field)) < 1:
      fail(f"{field}={getattr(c, field)} must be >= 1.")
  if c.num_classes < 0:
    fail(f"num_classes={c.num_classes} must be >= 0 (0: unconditional).")
  if c.ch < 4:
    fail(f"ch={c.ch} must be >= 4 (the time embedding has ch sinusoids).")
  if not c.ch_mult or min(c.ch_mult) < 1:
    fail(f"ch_mult={c.ch_mult} must be a non-empty tuple of positive integers.")
  if not 0.0 <= c.dropout < 1.0:
    fail(f"dropout={c.dropout} must be in [0, 1).")
  factor = 2 ** (c.num_resolutions - 1)
  if c.image_size % factor:
    fail(f"image_size={c.image_size} must be divisible by 2**(len(ch_mult) - 1) = {factor} "
         f"so that every downsampling halves the size exactly; use fewer levels.")
  unknown = [r for r in c.attn_resolutions if r not in c.resolutions]
  if unknown:
    fail(f"attn_resolutions {unknown} match no level; the levels have resolutions "
         f"{c.resolutions}.")
  for channels in _normalized_channels(c):
    if channels % c.num_groups:
      fail(f"num_groups={c.num_groups} does not divide {channels} channels (a GroupNorm "
           f"input); pick num_groups dividing ch * ch_mult and the concatenated skips.")


def _normalized_channels(c: UNetConfig) -> set[int]:
  """Every channel count that enters a GroupNorm."""
  out = {c.ch}
  skips = [c.ch]
  for i in range(c.num_resolutions):
    out.add(c.level_channels(i))
    skips += [c.level_channels(i)] * (c.num_res_blocks + (i != c.num_resolutions - 1))
  h = c.level_channels(c.num_resolutions - 1)
  for i in reversed(range(c.num_resolutions)):
    for _ in range(c.num_res_blocks + 1):
      out.add(h + skips.pop())
      h = c.level_channels(i)
  return out


def _resnet_block(c: UNetConfig) -> type[nn.Module]:
  """`layers.ResnetBlock`, rematerialized when `c.remat` (`train`, argument 3, is static)."""
  return nn.remat(layers.ResnetBlock, static_argnums=(3,)) if c.remat else layers.ResnetBlock


def _attn_block(c: UNetConfig) -> type[nn.Module]:
  """`layers.AttnBlock`, rematerialized when `c.remat`."""
  return nn.remat(layers.AttnBlock) if c.remat else layers.AttnBlock


class _TimestepEmbed(nn.Module):
  """sinusoid(ch) -> dense0 (4 ch) -> swish -> dense1 (4 ch)."""
  config: UNetConfig
  ops: ops_lib.Ops

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:  # [B] -> [B, 4 ch]
    c, dtype = self.config, self.config.compute_dtype
    temb = layers.timestep_embedding(t, c.ch)  # [B, ch] float32
    temb = layers.Dense(4 * c.ch, dtype=dtype, ops=self.ops, name="dense0")(temb)
    return layers.Dense(4 * c.ch, dtype=dtype, ops=self.ops, name="dense1")(nn.swish(temb))


class _DownLevel(nn.Module):
  """Res blocks (+ attention) of one level, then the downsampling (not at the last level)."""
  config: UNetConfig
  level: int
  ops: ops_lib.Ops

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> list[jax.Array]:
    c, dtype, ops = self.config, self.config.compute_dtype, self.ops
    outputs = []
    for j in range(c.num_res_blocks):
      h = _resnet_block(c)(c.level_channels(self.level), c.dropout, c.num_groups,
                           dtype=dtype, ops=ops, name=f"block_{j}")(h, temb, train)
      if h.shape[1] in c.attn_resolutions:
        h = _attn_block(c)(c.num_groups, dtype=dtype, ops=ops, name=f"attn_{j}")(h)
      outputs.append(h)
    if self.level != c.num_resolutions - 1:
      outputs.append(layers.Downsample(c.resamp_with_conv, dtype=dtype, ops=ops,
                                       name="downsample")(h))
    return outputs


class _Middle(nn.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution."""
  config: UNetConfig
  ops: ops_lib.Ops

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    c, dtype, ops = self.config, self.config.compute_dtype, self.ops
    channels = h.shape[-1]
    h = _resnet_block(c)(channels, c.dropout, c.num_groups, dtype=dtype, ops=ops,
                         name="block_1")(h, temb, train)
    h = _attn_block(c)(c.num_groups, dtype=dtype, ops=ops, name="attn_1")(h)
    return _resnet_block(c)(channels, c.dropout, c.num_groups, dtype=dtype, ops=ops,
                            name="block_2")(h, temb, train)


class _UpLevel(nn.Module):
  """num_res_blocks + 1 res blocks on [h, skip] (+ attention), then upsampling (not at 0)."""
  config: UNetConfig
  level: int
  ops: ops_lib.Ops

  @nn.compact
  def __call__(self, h: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
               train: bool) -> jax.Array:
    c, dtype, ops = self.config, self.config.compute_dtype, self.ops
    for j, skip in enumerate(skips):
      h = jnp.concatenate([h, skip], axis=-1)  # [B, H, W, C_h + C_skip]
      h = _resnet_block(c)(c.level_channels(self.level), c.dropout, c.num_groups,
                           dtype=dtype, ops=ops, name=f"block_{j}")(h, temb, train)
      if h.shape[1] in c.attn_resolutions:
        h = _attn_block(c)(c.num_groups, dtype=dtype, ops=ops, name=f"attn_{j}")(h)
    if self.level != 0:
      h = layers.Upsample(c.resamp_with_conv, dtype=dtype, ops=ops, name="upsample")(h)
    return h


class UNet(nn.Module):
  """The official DDPM U-Net: `UNet(config)(x [B,H,W,C], t [B], train) -> [B,H,W,out]`.

  The output is float32 whatever the compute dtype. Dropout (train=True, dropout > 0)
  draws from the 'dropout' rng stream.

  Attributes:
    config: the architecture.
    ops: the convolutions, GroupNorm and dropout (`diffusion_jax.ops`; default the
      pure-JAX reference).
  """
  config: UNetConfig
  ops: ops_lib.Ops = ops_lib.XLA

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, train: bool = False,
               y: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, C], t [B] timesteps, y [B] int class labels in [0, num_classes] (the
    last is the null class; only for class-conditional networks) -> [B, H, W, out]."""
    c, dtype = self.config, self.config.compute_dtype
    expected = (c.image_size, c.image_size, c.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"UNet input x has shape {tuple(x.shape)}; this config expects "
                       f"[B, {c.image_size}, {c.image_size}, {c.in_channels}] (NHWC).")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
      raise ValueError(f"UNet timesteps t have shape {tuple(t.shape)}; expected "
                       f"[{x.shape[0]}] (one per example).")
    if c.num_classes and (y is None or y.shape != t.shape):
      raise ValueError(f"This class-conditional UNet (num_classes={c.num_classes}) needs "
                       f"labels y of shape {tuple(t.shape)}; got "
                       f"{None if y is None else tuple(y.shape)}.")
    if not c.num_classes and y is not None:
      raise ValueError("This UNet is unconditional (num_classes=0) but got labels y; set "
                       "model.num_classes to train a class-conditional network.")
    ops = self.ops
    temb = _TimestepEmbed(c, ops, name="temb")(t)  # [B, 4 ch]
    if c.num_classes:
      table = self.param("class_embed", nn.initializers.normal(stddev=1.0),
                         (c.num_classes + 1, 4 * c.ch), jnp.float32)  # [N + 1, 4 ch]
      temb = temb + jnp.take(table, y.astype(jnp.int32), axis=0).astype(temb.dtype)
    hs = [layers.Conv3x3(c.ch, dtype=dtype, ops=ops, name="conv_in")(x.astype(dtype))]
    for i in range(c.num_resolutions):
      hs += _DownLevel(c, i, ops, name=f"down_{i}")(hs[-1], temb, train)
    h = _Middle(c, ops, name="mid")(hs[-1], temb, train)
    for i in reversed(range(c.num_resolutions)):
      skips = [hs.pop() for _ in range(c.num_res_blocks + 1)]
      h = _UpLevel(c, i, ops, name=f"up_{i}")(h, skips, temb, train)
    assert not hs
    h = layers.GroupNorm(c.num_groups, dtype=dtype, swish=True, ops=ops, name="norm_out")(h)
    h = layers.Conv3x3(c.out_channels, init_scale=0.0, dtype=dtype, ops=ops,
                       name="conv_out")(h)
    return h.astype(jnp.float32)  # [B, H, W, out_channels]
