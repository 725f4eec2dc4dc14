r"""Imports released DDPM weights into a workdir that sampling and evaluation read directly.

  python -m diffusion_jax.tools.import_checkpoint --src google/ddpm-cifar10-32 \
      --workdir workdirs/cifar10_official
  python -m diffusion_jax.tools.import_checkpoint --config configs/cifar10.py \
      --src diffusion_cifar10_model/model.ckpt-790000 --workdir workdirs/cifar10_official
  python -m diffusion_jax.tools.import_checkpoint --config configs/lsun_church256.py \
      --src ddpm-ema-church-256/ --workdir workdirs/church_official

Sources: a released model by name (`google/ddpm-cifar10-32`, `google/ddpm-church-256`,
... see `convert.released_models`: downloaded through huggingface_hub into its cache,
resumable; found there offline, `--offline` or HF_HUB_OFFLINE=1 never uses the network;
`--hub_cache` picks another cache), an official TensorFlow checkpoint (prefix, or a
directory: its latest checkpoint; `--ema` (default) takes the /ExponentialMovingAverage
copies, `--raw` the raw weights), or a diffusers `UNet2DModel` (a directory with
config.json and diffusion_pytorch_model.safetensors/.bin, possibly under unet/, or a
weights file). Without `--config`, a diffusers model picks the experiment config whose
network its own config.json describes (and its scheduler config sets the diffusion);
the choice is printed, to pass as `--config` to the evaluation jobs.
The weights must fit the config's architecture exactly; every problem is reported before
anything is written, and a workdir that already holds checkpoints is never touched.
The imported weights become both the parameters and the EMA parameters of the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.convert import diffusers_weights
from diffusion_jax.convert import released_models
from diffusion_jax.convert import tf_checkpoint
from diffusion_jax.models import build
from diffusion_jax.training import checkpointing
from diffusion_jax.training import params_checkpoint

FORMATS = ("auto", "tf", "diffusers")


def load_released_weights(src: str, config: ml_collections.ConfigDict, *,
                          use_ema: bool = True, fmt: str = "auto"
                          ) -> tuple[dict[str, Any], int]:
  """Reads and checks released weights for `config`'s U-Net (writes nothing).

  Args:
    src: TF checkpoint (prefix or directory) or diffusers model (directory or file).
    config: the experiment configuration whose architecture the weights must fit.
    use_ema: TF only: the EMA copies (True) or the raw weights (False).
    fmt: "auto" (detect), "tf" or "diffusers".

  Returns:
    (params, step): float32 NumPy parameters; the TF global_step, or 0.

  Raises:
    CheckpointMismatchError / ValueError / FileNotFoundError: before anything is written.
  """
  if fmt not in FORMATS:
    raise ValueError(f"Unknown format {fmt!r}; use one of {FORMATS}.")
  unet_config = build.unet_config_from(config)
  if fmt == "auto":
    if tf_checkpoint.is_tf_checkpoint(src):
      fmt = "tf"
    elif diffusers_weights.is_diffusers_source(src):
      fmt = "diffusers"
    else:
      raise FileNotFoundError(
          f"{src} is neither a TensorFlow checkpoint (prefix with .index, or a directory "
          f"with a 'checkpoint' file) nor a diffusers model (config.json + "
          f"{diffusers_weights.WEIGHTS_NAME}); pass --format to force one.")
  if fmt == "tf":
    params, step = tf_checkpoint.load_tf_checkpoint(src, unet_config, use_ema=use_ema)
    return params, int(step or 0)
  params, _ = diffusers_weights.load_diffusers(src, unet_config)
  return params, 0


def check_new_workdir(workdir: str) -> None:
  """Raises FileExistsError when `workdir` already holds checkpoints."""
  existing = checkpointing.list_steps(workdir)
  if existing:
    raise FileExistsError(f"The workdir {workdir} already holds checkpoints "
                          f"{[f'{sub}/{step}' for step, sub in existing]}; choose a new "
                          f"--workdir (nothing was written).")


def import_checkpoint(src: str, workdir: str, config: ml_collections.ConfigDict, *,
                      use_ema: bool = True, fmt: str = "auto") -> str:
  """Imports released weights into a new workdir as this project's checkpoint.

  Args:
    src: see `load_released_weights`.
    workdir: destination; must not hold checkpoints yet.
    config: the experiment configuration (saved with the checkpoint).
    use_ema: TF only: the EMA copies (True) or the raw weights (False).
    fmt: "auto", "tf" or "diffusers".

  Returns:
    The path of the written checkpoint.
  """
  check_new_workdir(workdir)
  params, step = load_released_weights(src, config, use_ema=use_ema, fmt=fmt)
  logging.info("Read %d tensors from %s (step %d).", len(jax.tree_util.tree_leaves(params)),
               src, step)
  return params_checkpoint.write_params_checkpoint(workdir, config, params,
                                                   ema_params=params, step=step)


def resolve_source(src: str, config: ml_collections.ConfigDict | None, *,
                   hub_cache: str | None = None, offline: bool | None = None
                   ) -> tuple[str, ml_collections.ConfigDict, str]:
  """(local source, config, where the config came from) of a `--src` and `--config`.

  A hub name is fetched (cache first, see `released_models.fetch`); without a config, a
  diffusers model's config.json picks one (`released_models.infer_config`).

  Raises:
    FileNotFoundError / ValueError: naming the fix, before anything is written.
  """
  name = ""
  if released_models.is_hub_name(src):
    name, src = src, released_models.fetch(src, hub_cache, offline)
  if config is not None:
    return src, config, "--config"
  if not diffusers_weights.is_diffusers_source(src):
    raise ValueError(f"{src} is not a diffusers model, so there is no config.json to read "
                     "the experiment config from; pass --config (e.g. configs/cifar10.py).")
  weights, _ = diffusers_weights.find_diffusers_files(src)
  config, origin = released_models.infer_config(os.path.dirname(weights), name)
  return src, config, origin


def define_flags() -> None:
  """Defines the command's flags (only when run as a command: other tools define theirs)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file (default for a "
                                  "diffusers model: the one its config.json matches).",
                                  lock_config=True)
  flags.DEFINE_string("src", None, "Released model name (google/ddpm-cifar10-32, ...), TF "
                      "checkpoint (prefix or directory) or diffusers model (directory or "
                      "weights file).")
  flags.DEFINE_string("workdir", None, "New workdir to write the checkpoint to.")
  flags.DEFINE_enum("format", "auto", FORMATS, "Source format.")
  flags.DEFINE_bool("ema", False, "TF: import the EMA weights (the default).")
  flags.DEFINE_bool("raw", False, "TF: import the raw (non-EMA) weights.")
  flags.DEFINE_string("hub_cache", None, "Hugging Face hub cache (default: "
                      "huggingface_hub's, HF_HUB_CACHE or ~/.cache/huggingface/hub).")
  flags.DEFINE_bool("offline", None, "Never use the network for hub names (default: the "
                    "HF_HUB_OFFLINE environment variable).")
  flags.mark_flags_as_required(["src", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.ema and f.raw:
    raise app.UsageError("Pass at most one of --ema and --raw.")
  check_new_workdir(f.workdir)  # before any download
  src, config, origin = resolve_source(f.src, f.config, hub_cache=f.hub_cache,
                                       offline=f.offline)
  path = import_checkpoint(src, f.workdir, config, use_ema=not f.raw, fmt=f.format)
  logging.info("Wrote %s", path)
  print(path)
  if origin != "--config":
    print(f"config: {origin} (pass --config {origin} to the evaluation jobs)")


def run() -> None:
  """Command entry: bad input ends with one line on stderr and exit status 1
  (`diffusion_jax.cli`)."""
  define_flags()
  cli.define_verbose_flag()
  app.run(cli.absl_main(main))


if __name__ == "__main__":
  run()
