"""`UNetConfig` <-> the `config.json` of a diffusers `UNet2DModel`.

The released DDPM models (`ddpm-cifar10-32`, `ddpm-celebahq-256`, `ddpm-church-256`,
`ddpm-bedroom-256`, `ddpm-cat-256`) are `UNet2DModel`s whose config selects the official
network: sinusoids [sin, cos] with `freq_shift` 1, single-head attention
(`attention_head_dim` null), GroupNorm eps 1e-6, `downsample_padding` 0 (diffusers then
pads right/bottom by one, as TF "SAME"), conv resampling, and `AttnDownBlock2D` /
`AttnUpBlock2D` at the levels whose resolution has attention. Anything else is rejected
with the offending keys named, since the weights would compute a different function.
"""

from __future__ import annotations

from typing import Any, Mapping

from diffusion_jax.models.unet import UNetConfig

# Oldest diffusers release whose `UNet2DModel` reads every key `diffusers_config_from` writes.
MIN_DIFFUSERS_VERSION = "0.24.0"

_MISSING = object()

# key: (UNet2DModel's default when the key is absent, accepted values, what it means).
_REQUIRED = {
    "act_fn": ("silu", ("silu", "swish"), "swish nonlinearity"),
    "time_embedding_type": ("positional", ("positional",), "sinusoidal time embedding"),
    "flip_sin_to_cos": (True, (False,), "[sin, cos] order"),
    "freq_shift": (0, (1,), "frequencies 10000^(-i/(half-1))"),
    "center_input_sample": (False, (False,), "inputs already in [-1, 1]"),
    "downsample_padding": (1, (0,), "TF SAME padding (right/bottom) of the stride-2 conv"),
    "downsample_type": ("conv", ("conv",), "stride-2 conv downsampling"),
    "upsample_type": ("conv", ("conv",), "nearest x2 + conv upsampling"),
    "mid_block_type": ("UNetMidBlock2D", ("UNetMidBlock2D",), "res-attn-res middle"),
    "mid_block_scale_factor": (1, (1,), "unscaled residuals"),
    "resnet_time_scale_shift": ("default", ("default",), "additive time embedding"),
    "add_attention": (True, (True,), "attention in the middle block"),
    "class_embed_type": (None, (None,), "a learned class embedding (or none)"),
}
_ARCH_FIELDS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resamp_with_conv",
                "in_channels", "out_channels", "num_groups", "image_size", "num_classes")


def unet_config_from_diffusers(cfg: Mapping[str, Any], *, dropout: float | None = None,
                               dtype: str = "float32") -> UNetConfig:
  """The `UNetConfig` of a diffusers `UNet2DModel` config.json.

  Args:
    cfg: the parsed config.json.
    dropout: overrides the config's `dropout` (absent in the released configs: 0).
    dtype: compute dtype of the returned config.

  Returns:
    The equivalent `UNetConfig`.

  Raises:
    ValueError: when the config is not the official DDPM network, listing every key that
      differs and the value it needs.
  """
  def get(key, default=_MISSING):
    return cfg.get(key, default)

  problems = []
  class_name = get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    problems.append(f"_class_name={class_name!r} (need 'UNet2DModel')")
  for key, (default, accepted, meaning) in _REQUIRED.items():
    value = get(key, default)
    if value not in accepted:
      shown = "absent (default " + repr(default) + ")" if key not in cfg else repr(value)
      problems.append(f"{key}={shown} (need {accepted[0]!r}: {meaning})")
  if abs(float(get("norm_eps", 1e-5)) - 1e-6) > 1e-12:
    problems.append(f"norm_eps={get('norm_eps', '1e-05 (default)')} (need 1e-06)")

  boc = [int(c) for c in get("block_out_channels", (224, 448, 672, 896))]
  ch = boc[0]
  if any(c % ch for c in boc):
    problems.append(f"block_out_channels={boc} are not multiples of the first entry")
  groups = int(get("norm_num_groups", 32))
  attn_groups = get("attn_norm_num_groups", None)
  if attn_groups not in (None, groups):
    problems.append(f"attn_norm_num_groups={attn_groups} (need null or {groups})")
  temb_dim = get("time_embedding_dim", None)
  if temb_dim not in (None, 4 * ch):
    problems.append(f"time_embedding_dim={temb_dim} (need null or {4 * ch})")

  size = get("sample_size", None)
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      problems.append(f"sample_size={size} (need a square size)")
    size = size[0]
  if size is None:
    problems.append("sample_size is missing (need the image side length)")
    size = 0
  down = list(get("down_block_types", ()))
  up = list(get("up_block_types", ()))
  if len(down) != len(boc) or len(up) != len(boc):
    problems.append(f"{len(down)} down and {len(up)} up block types for "
                    f"{len(boc)} block_out_channels")
  attn_resolutions = []
  for i, kind in enumerate(down):
    if kind not in ("DownBlock2D", "AttnDownBlock2D"):
      problems.append(f"down_block_types[{i}]={kind!r} (need DownBlock2D/AttnDownBlock2D)")
    if kind == "AttnDownBlock2D":
      attn_resolutions.append(int(size) // 2**i)
    if len(up) == len(down):
      want = "AttnUpBlock2D" if kind == "AttnDownBlock2D" else "UpBlock2D"
      k = len(down) - 1 - i
      if up[k] != want:
        problems.append(f"up_block_types[{k}]={up[k]!r} (need {want!r} to mirror "
                        f"down_block_types[{i}]={kind!r})")
  head_dim = get("attention_head_dim", 8)
  if head_dim is not None:
    attn_channels = {boc[-1]} | {boc[i] for i, k in enumerate(down) if k == "AttnDownBlock2D"}
    if attn_channels != {int(head_dim)}:
      problems.append(f"attention_head_dim={head_dim} (need null: single-head attention "
                      f"over {sorted(attn_channels)} channels)")
  class_embeds = get("num_class_embeds", None)
  if class_embeds is not None and int(class_embeds) < 2:
    problems.append(f"num_class_embeds={class_embeds} (need null, or N + 1 >= 2: N "
                    "classes and the null class, last)")
  if problems:
    raise ValueError("The diffusers config is not the official DDPM U-Net:\n  - "
                     + "\n  - ".join(problems))
  return UNetConfig(
      ch=ch,
      ch_mult=tuple(c // ch for c in boc),
      num_res_blocks=int(get("layers_per_block", 2)),
      attn_resolutions=tuple(attn_resolutions),
      dropout=float(get("dropout", 0.0)) if dropout is None else float(dropout),
      resamp_with_conv=True,
      in_channels=int(get("in_channels", 3)),
      out_channels=int(get("out_channels", 3)),
      num_groups=groups,
      image_size=int(size),
      dtype=dtype,
      num_classes=int(class_embeds) - 1 if class_embeds is not None else 0,
  )


def diffusers_config_from(unet_config: UNetConfig) -> dict[str, Any]:
  """The config.json of the `UNet2DModel` that computes `unet_config`'s network.

  Raises:
    ValueError: for `resamp_with_conv=False`, which `UNet2DModel` cannot express.
  """
  c = unet_config
  if not c.resamp_with_conv:
    raise ValueError("diffusers' UNet2DModel has no pooling/plain-nearest resampling; a "
                     "model with resamp_with_conv=False cannot be exported to it.")
  attn = [r in c.attn_resolutions for r in c.resolutions]
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    version = diffusers.__version__
  except ImportError:
    version = MIN_DIFFUSERS_VERSION
  config = {"_class_name": "UNet2DModel", "_diffusers_version": version}
  config.update({key: accepted[0] for key, (_, accepted, _) in _REQUIRED.items()})
  config.update({
      "attention_head_dim": None,
      "attn_norm_num_groups": None,
      "block_out_channels": [c.level_channels(i) for i in range(c.num_resolutions)],
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "dropout": c.dropout,
      "in_channels": c.in_channels,
      "layers_per_block": c.num_res_blocks,
      "norm_eps": 1e-6,
      "norm_num_groups": c.num_groups,
      "num_class_embeds": c.num_classes + 1 if c.num_classes else None,
      "num_train_timesteps": None,
      "out_channels": c.out_channels,
      "sample_size": c.image_size,
      "time_embedding_dim": None,
  })
  return config


def architecture_differences(found: UNetConfig, expected: UNetConfig) -> list[str]:
  """The architecture fields (all but dropout and dtype) in which two configs differ."""
  return [f"{name}: checkpoint {getattr(found, name)!r} vs config "
          f"{getattr(expected, name)!r}"
          for name in _ARCH_FIELDS if getattr(found, name) != getattr(expected, name)]

