"""Import of the official TensorFlow DDPM checkpoints (hojonathanho/diffusion).

The official graph builds the U-Net under the variable scope `model`, so a parameter
`params['down_1']['attn_0']['q']['kernel']` is the TF variable `model/down_1/attn_0/q/W`
(same shape); leaves map W -> kernel, b -> bias, and for GroupNorm gamma -> scale,
beta -> bias. The exponential moving average of a variable is stored as
`<name>/ExponentialMovingAverage`. Optimizer slots (`<name>/Adam`, ...), `global_step`
and other variables outside the model scope are not model weights and are skipped; every
model variable of the chosen copy (EMA or raw) must be consumed.
"""

from __future__ import annotations

import os
from typing import Any

from diffusion_jax.convert import mismatch
from diffusion_jax.models import build
from diffusion_jax.models.unet import UNetConfig

EMA_SUFFIX = "/ExponentialMovingAverage"
DEFAULT_SCOPE = "model"
_NORM_MODULES = ("norm", "norm1", "norm2", "norm_out")


def tf_variable_name(path: tuple[str, ...], scope: str = DEFAULT_SCOPE) -> str:
  """The official TF variable name of one of our parameter paths."""
  module, leaf = path[:-1], path[-1]
  if module[-1] in _NORM_MODULES:
    tf_leaf = {"scale": "gamma", "bias": "beta"}[leaf]
  else:
    tf_leaf = {"kernel": "W", "bias": "b"}[leaf]
  return "/".join((scope,) + module + (tf_leaf,))


def tf_variables(unet_config: UNetConfig,
                 scope: str = DEFAULT_SCOPE) -> dict[tuple[str, ...], tuple[str, tuple]]:
  """{our param path: (official TF name, shape)} in model order."""
  shapes = mismatch.flatten_params(build.param_shapes(unet_config))
  return {path: (tf_variable_name(path, scope), tuple(shapes[path].shape))
          for path in build.param_paths(unet_config)}


def _index_prefixes(directory: str) -> list[str]:
  return sorted(os.path.join(directory, name[:-len(".index")])
                for name in os.listdir(directory) if name.endswith(".index"))


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix: `path` itself, or the one checkpoint of a directory.

  A directory resolves through its `checkpoint` file (the latest), or else to its only
  `*.index` checkpoint.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is not None:
      return latest
    prefixes = _index_prefixes(path)
    if len(prefixes) == 1:
      return prefixes[0]
    if not prefixes:
      raise FileNotFoundError(f"No TensorFlow checkpoint in the directory {path}.")
    raise ValueError(f"{path} holds several checkpoints {prefixes}; pass one prefix.")
  if not os.path.exists(path + ".index"):
    raise FileNotFoundError(f"No TensorFlow checkpoint at {path} (expected {path}.index).")
  return path


def is_tf_checkpoint(path: str) -> bool:
  """Whether `path` is a TF checkpoint prefix or a directory holding checkpoints."""
  if os.path.isdir(path):
    return (os.path.exists(os.path.join(path, "checkpoint"))
            or bool(_index_prefixes(path)))
  return os.path.exists(path + ".index")


def load_tf_checkpoint(path: str, unet_config: UNetConfig, *, use_ema: bool = True,
                       scope: str = DEFAULT_SCOPE) -> tuple[dict[str, Any], int | None]:
  """Reads an official TF checkpoint into our parameters, checking every variable first.

  Args:
    path: checkpoint prefix (e.g. `.../model.ckpt-790000`) or its directory (latest).
    unet_config: the architecture the checkpoint must fit.
    use_ema: take the `/ExponentialMovingAverage` copies (True) or the raw weights.
    scope: the model's variable scope in the checkpoint.

  Returns:
    (params, step): float32 NumPy parameters, and `global_step` if the file has one.

  Raises:
    CheckpointMismatchError: naming the first missing, unused or mis-shaped variables.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  prefix = resolve_checkpoint(path)
  reader = tf.train.load_checkpoint(prefix)
  stored = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
  table = tf_variables(unet_config, scope)
  expected = {name: shape for name, shape in table.values()}

  chosen = {}  # Model-variable name (without the EMA suffix) -> shape, of the chosen copy.
  for name, shape in stored.items():
    if not name.startswith(scope + "/"):
      continue  # global_step, beta1_power, ...: not model weights.
    is_ema = name.endswith(EMA_SUFFIX)
    base = name[:-len(EMA_SUFFIX)] if is_ema else name
    if base in expected:
      if is_ema == use_ema:
        chosen[base] = shape
    elif not is_ema and name.rsplit("/", 1)[0] in expected:
      continue  # An optimizer slot of a model variable, e.g. model/conv_in/W/Adam.
    else:
      chosen[name] = shape  # Unknown to the architecture: reported as unused.
  copy = "EMA (/ExponentialMovingAverage)" if use_ema else "raw"
  hint = f"Read the {copy} weights under the variable scope '{scope}'."
  if not chosen.keys() & expected.keys():
    other_suffix = "" if use_ema else EMA_SUFFIX
    if any(name + other_suffix in stored for name in expected):
      hint += (" The checkpoint has the other copy: use "
               + ("--raw (use_ema=False)." if use_ema else "--ema (use_ema=True)."))
  mismatch.check_variables(expected, chosen, source=f"{prefix} (TensorFlow)", hint=hint)

  suffix = EMA_SUFFIX if use_ema else ""
  flat = {path: mismatch.as_float32(name, reader.get_tensor(name + suffix))
          for path, (name, _) in table.items()}
  step = int(reader.get_tensor("global_step")) if "global_step" in stored else None
  return mismatch.unflatten_params(flat), step
