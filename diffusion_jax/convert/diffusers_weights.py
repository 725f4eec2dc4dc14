"""Import and export of diffusers `UNet2DModel` weights (safetensors or torch state dicts).

Name mapping (ours -> diffusers; L = number of levels):
  conv_in -> conv_in;  temb/dense{0,1} -> time_embedding.linear_{1,2}
  down_i/block_j/{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}
      -> down_blocks.i.resnets.j.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}
  down_i/attn_j/{norm,q,k,v,proj_out}
      -> down_blocks.i.attentions.j.{group_norm,to_q,to_k,to_v,to_out.0}
      (older files name these query, key, value, proj_attn: accepted on import)
  down_i/downsample/conv -> down_blocks.i.downsamplers.0.conv
  mid/{block_1,attn_1,block_2} -> mid_block.{resnets.0,attentions.0,resnets.1}
  up_i/... -> up_blocks.(L-1-i)....;  up_i/upsample/conv -> up_blocks.(L-1-i).upsamplers.0.conv
  norm_out -> conv_norm_out;  conv_out -> conv_out
  class_embed (class-conditional networks) -> class_embedding.weight ([N + 1, 4 ch] both)
Leaves: kernel/scale -> weight, bias -> bias. Conv kernels HWIO <-> OIHW, dense kernels
[in, out] <-> Linear [out, in], the 1x1 nin_shortcut [in, out] <-> Conv2d [out, in, 1, 1].

Files are read without executing code: safetensors, or torch files with
`torch.load(..., weights_only=True)`; plain pickle is never used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import safetensors.numpy

from diffusion_jax.convert import diffusers_config
from diffusion_jax.convert import mismatch
from diffusion_jax.models import build
from diffusion_jax.models.unet import UNetConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TORCH_WEIGHTS_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.pt")
CONFIG_NAME = "config.json"
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj",
           "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
         "proj_out": "to_out.0"}
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _module_name(path: tuple[str, ...], num_levels: int) -> str:
  """Our module path (without the leaf) -> the diffusers module name."""
  head, rest = path[0], path[1:]
  if head in ("conv_in", "conv_out"):
    return head
  if head == "norm_out":
    return "conv_norm_out"
  if head == "temb":
    return {"dense0": "time_embedding.linear_1", "dense1": "time_embedding.linear_2"}[rest[0]]
  if head == "mid":
    block = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[rest[0]]
    sub = _ATTN[rest[1]] if rest[0] == "attn_1" else _RESNET[rest[1]]
    return f"mid_block.{block}.{sub}"
  side, level = head.split("_")
  prefix = (f"down_blocks.{level}" if side == "down"
            else f"up_blocks.{num_levels - 1 - int(level)}")
  kind, _, index = rest[0].partition("_")
  if kind == "block":
    return f"{prefix}.resnets.{index}.{_RESNET[rest[1]]}"
  if kind == "attn":
    return f"{prefix}.attentions.{index}.{_ATTN[rest[1]]}"
  return f"{prefix}.{'downsamplers' if side == 'down' else 'upsamplers'}.0.conv"


def _leaf_kind(path: tuple[str, ...], ndim: int) -> str:
  if path[-1] != "kernel":
    return "vector"
  if ndim == 4:
    return "conv"
  return "conv1x1" if path[-2] == "nin_shortcut" else "linear"


def _to_torch_layout(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if kind == "conv1x1":
    return array.T[:, :, None, None]  # [in, out] -> [out, in, 1, 1]
  if kind == "linear":
    return array.T  # [in, out] -> [out, in]
  return array


def _from_torch_layout(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if kind == "conv1x1":
    return array[:, :, 0, 0].T  # [out, in, 1, 1] -> [in, out]
  if kind == "linear":
    return array.T
  return array


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch_layout(kind, np.empty(shape, np.int8)).shape


def diffusers_names(unet_config: UNetConfig) -> dict[tuple[str, ...], tuple[str, str, tuple]]:
  """{our param path: (diffusers name, layout kind, diffusers shape)} in model order."""
  shapes = mismatch.flatten_params(build.param_shapes(unet_config))
  table = {}
  for path in build.param_paths(unet_config):
    leaf = shapes[path]
    if path == ("class_embed",):  # nn.Embedding's [rows, dim] is ours as it is
      table[path] = ("class_embedding.weight", "vector", tuple(leaf.shape))
      continue
    kind = _leaf_kind(path, len(leaf.shape))
    leaf_name = "bias" if path[-1] == "bias" else "weight"
    name = f"{_module_name(path[:-1], unet_config.num_resolutions)}.{leaf_name}"
    table[path] = (name, kind, _torch_shape(kind, tuple(leaf.shape)))
  return table


def _shape_of(value: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in value.shape)


def rename_legacy_attention(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Maps the older attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0.

  Raises:
    CheckpointMismatchError: when a legacy and a current name hold the same weight.
  """
  renamed = {}
  for name, value in state_dict.items():
    match = _LEGACY_RE.match(name)
    new = (f"{match.group(1)}.{_LEGACY_ATTN[match.group(2)]}.{match.group(3)}"
           if match else name)
    if new in renamed:
      raise mismatch.CheckpointMismatchError(
          f"The state dict holds both {name} and {new} (the same attention weight).")
    renamed[new] = value
  return renamed


def params_from_state_dict(state_dict: Mapping[str, Any], unet_config: UNetConfig, *,
                           source: str = "(state dict)") -> dict[str, Any]:
  """Our float32 parameter tree from a diffusers `UNet2DModel` state dict.

  Args:
    state_dict: {name: array or torch tensor} (NumPy-convertible values).
    unet_config: the architecture the weights must fit.
    source: the checkpoint's description for error messages.

  Returns:
    The 'params' collection as a nested dict of float32 NumPy arrays.

  Raises:
    CheckpointMismatchError: when a name is missing or unused or a shape differs.
  """
  state_dict = rename_legacy_attention(state_dict)
  table = diffusers_names(unet_config)
  mismatch.check_variables(
      {name: shape for name, _, shape in table.values()},
      {name: _shape_of(value) for name, value in state_dict.items()},
      source=source)
  flat = {path: _from_torch_layout(kind, mismatch.as_float32(name, _to_numpy(
              state_dict[name]))) for path, (name, kind, _) in table.items()}
  return mismatch.unflatten_params(
      {path: np.ascontiguousarray(a) for path, a in flat.items()})


def state_dict_from_params(params: Any, unet_config: UNetConfig) -> dict[str, np.ndarray]:
  """The diffusers `UNet2DModel` state dict (float32 NumPy) of our parameters.

  Raises:
    CheckpointMismatchError: when `params` does not fit `unet_config`.
  """
  flat = mismatch.flatten_params(jax.device_get(params))
  table = diffusers_names(unet_config)
  mismatch.check_variables(
      {"/".join(p): tuple(s.shape) for p, s in
       mismatch.flatten_params(build.param_shapes(unet_config)).items()},
      {"/".join(p): _shape_of(v) for p, v in flat.items()},
      source="(parameters to export)")
  return {name: np.ascontiguousarray(_to_torch_layout(kind, np.asarray(flat[path],
                                                                       np.float32)))
          for path, (name, kind, _) in table.items()}


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor.
    import torch  # pylint: disable=g-import-not-at-top
    tensor = value.detach().cpu()
    if tensor.dtype == torch.bfloat16:
      tensor = tensor.float()
    return tensor.numpy()
  return np.asarray(value)


def read_state_dict(path: str) -> dict[str, Any]:
  """Reads a weights file without executing code from it.

  Args:
    path: a `.safetensors` file, or a torch file (.bin, .pt, .pth, .ckpt) holding a flat
      {name: tensor} dict, loaded with `weights_only=True` (needs torch installed).

  Returns:
    {name: array or tensor}.
  """
  if path.endswith(".safetensors"):
    return dict(safetensors.numpy.load_file(path))
  if path.endswith(_TORCH_SUFFIXES):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"Reading the torch file {path} needs PyTorch; install torch, or "
                        f"convert the file to safetensors.") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
      raise mismatch.CheckpointMismatchError(
          f"{path} does not hold a flat {{name: tensor}} state dict.")
    return dict(state)
  raise ValueError(f"Unknown weights file type: {path}; expected .safetensors or one of "
                   f"{_TORCH_SUFFIXES}.")


def find_diffusers_files(src: str) -> tuple[str, str | None]:
  """(weights file, config.json or None) of a model directory, its `unet/`, or a file."""
  if os.path.isfile(src):
    config = os.path.join(os.path.dirname(src), CONFIG_NAME)
    return src, (config if os.path.isfile(config) else None)
  if not os.path.isdir(src):
    raise FileNotFoundError(f"No such file or directory: {src}")
  for folder in (src, os.path.join(src, "unet")):
    for name in (WEIGHTS_NAME,) + TORCH_WEIGHTS_NAMES:
      if os.path.isfile(os.path.join(folder, name)):
        config = os.path.join(folder, CONFIG_NAME)
        return os.path.join(folder, name), (config if os.path.isfile(config) else None)
  raise FileNotFoundError(f"{src} holds no {WEIGHTS_NAME} or {TORCH_WEIGHTS_NAMES[0]} "
                          f"(also looked in {src}/unet).")


def is_diffusers_source(src: str) -> bool:
  """Whether `src` looks like diffusers weights (a weights file or a model directory)."""
  try:
    find_diffusers_files(src)
    return True
  except FileNotFoundError:
    return False


def load_diffusers(src: str, unet_config: UNetConfig | None = None, *,
                   dtype: str = "float32") -> tuple[dict[str, Any], UNetConfig]:
  """Loads diffusers `UNet2DModel` weights as our parameters.

  Args:
    src: a model directory (config.json + diffusion_pytorch_model.safetensors or .bin,
      possibly under `unet/`) or a weights file (its directory's config.json is used).
    unet_config: the architecture to load into. When given, the config.json (if any) must
      describe the same architecture; when None, the config.json decides.
    dtype: compute dtype of the returned config when it comes from config.json.

  Returns:
    (params, unet_config): float32 NumPy parameters and the architecture.

  Raises:
    CheckpointMismatchError / ValueError: on any architecture, name or shape mismatch.
  """
  weights_path, config_path = find_diffusers_files(src)
  if config_path is not None:
    with open(config_path) as f:
      found = diffusers_config.unet_config_from_diffusers(json.load(f), dtype=dtype)
    if unet_config is None:
      unet_config = found
    else:
      diffs = diffusers_config.architecture_differences(found, unet_config)
      if diffs:
        raise mismatch.CheckpointMismatchError(
            f"{config_path} describes another architecture than the configured one:\n  - "
            + "\n  - ".join(diffs))
  elif unet_config is None:
    raise ValueError(f"No {CONFIG_NAME} next to {weights_path}: pass the architecture "
                     f"(unet_config) explicitly.")
  params = params_from_state_dict(read_state_dict(weights_path), unet_config,
                                  source=weights_path)
  return params, unet_config


def export_diffusers(params: Any, unet_config: UNetConfig, out_dir: str, *,
                     overwrite: bool = False) -> str:
  """Writes our parameters as a diffusers `UNet2DModel` (config.json + safetensors).

  `UNet2DModel.from_pretrained(out_dir)` then computes the same function; re-importing
  with `load_diffusers(out_dir)` gives back the identical parameters.

  Args:
    params: our parameter tree (fitting `unet_config`).
    unet_config: the architecture.
    out_dir: output directory (created if needed).
    overwrite: replace existing files; otherwise existing files are an error.

  Returns:
    out_dir.
  """
  config = diffusers_config.diffusers_config_from(unet_config)
  state_dict = state_dict_from_params(params, unet_config)  # Validates before writing.
  targets = [os.path.join(out_dir, WEIGHTS_NAME), os.path.join(out_dir, CONFIG_NAME)]
  existing = [p for p in targets if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(f"{existing} already exist; pass overwrite=True (--overwrite) "
                          f"or choose another output directory.")
  os.makedirs(out_dir, exist_ok=True)
  payloads = [lambda p: safetensors.numpy.save_file(state_dict, p, metadata={"format": "pt"}),
              lambda p: _write_text(p, json.dumps(config, indent=2, sort_keys=True) + "\n")]
  for target, write in zip(targets, payloads):
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=os.path.basename(target))
    os.close(fd)
    try:
      write(tmp)
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  return out_dir


def _write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)
