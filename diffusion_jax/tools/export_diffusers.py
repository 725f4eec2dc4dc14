r"""Exports a workdir's parameters as a diffusers `UNet2DModel` (config.json + safetensors).

  python -m diffusion_jax.tools.export_diffusers --workdir workdirs/cifar10 --out cifar10_hf
  # then, in PyTorch: diffusers.UNet2DModel.from_pretrained("cifar10_hf")

Takes the EMA parameters of the newest checkpoint by default (`--raw` for the raw ones,
`--step` for another checkpoint). The configuration is the workdir's config.json unless
`--config` is given. Existing output files are kept unless `--overwrite`.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.convert import diffusers_weights
from diffusion_jax.models import build
from diffusion_jax.training import checkpointing
from diffusion_jax.training import params_checkpoint


def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration saved in the workdir (config.json)."""
  path = os.path.join(workdir, checkpointing.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No {checkpointing.CONFIG_FILE} in {workdir}; pass --config.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def export_workdir(workdir: str, out_dir: str,
                   config: ml_collections.ConfigDict | None = None, *,
                   use_ema: bool = True, step: int = -1, overwrite: bool = False) -> str:
  """Writes the parameters of a workdir's checkpoint in diffusers format.

  Args:
    workdir: the run's directory.
    out_dir: output directory for config.json and diffusion_pytorch_model.safetensors.
    config: the run's configuration (default: the workdir's config.json).
    use_ema: export the EMA parameters (True) or the raw ones.
    step: checkpoint step; -1 for the newest.
    overwrite: replace existing output files.

  Returns:
    out_dir.
  """
  config = read_workdir_config(workdir) if config is None else config
  unet_config = build.unet_config_from(config)
  params, loaded_step = params_checkpoint.load_eval_params(workdir, config, use_ema=use_ema,
                                                           step=step)
  diffusers_weights.export_diffusers(params, unet_config, out_dir, overwrite=overwrite)
  logging.info("Exported step %s (%s) of %s to %s.", loaded_step,
               "EMA" if use_ema else "raw", workdir, out_dir)
  return out_dir


def define_flags() -> None:
  """Defines the command's flags (only when run as a command: other tools define theirs)."""
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (default: the workdir's config.json).")
  flags.DEFINE_string("workdir", None, "The run's directory.")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_bool("raw", False, "Export the raw parameters instead of the EMA ones.")
  flags.DEFINE_integer("step", -1, "Checkpoint step (-1: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  print(export_workdir(f.workdir, f.out, f.config, use_ema=not f.raw, step=f.step,
                       overwrite=f.overwrite))


def run() -> None:
  """Command entry: bad input ends with one line on stderr and exit status 1
  (`diffusion_jax.cli`)."""
  define_flags()
  cli.define_verbose_flag()
  app.run(cli.absl_main(main))


if __name__ == "__main__":
  run()
