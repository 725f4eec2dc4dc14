"""Released DDPM models by name: the Hugging Face hub cache, and the matching experiment
config read off the model's own config.json.

Names (`RELEASED`): the diffusers ports of the official checkpoints,
`google/ddpm-cifar10-32` and the 256x256 `google/ddpm-{celebahq,church,bedroom,cat}-256`
with their `google/ddpm-ema-*-256` twins. Any other `owner/name` of a diffusers
`UNet2DModel` works too when its architecture picks one config.

Downloads go through `huggingface_hub.snapshot_download` into its cache (`HF_HUB_CACHE`,
by default ~/.cache/huggingface/hub; resumable, shared with diffusers and every other
hub client): only the config files and one weights file (safetensors, else the torch
.bin). The cache is looked at first, without any network access; `offline` (or
`HF_HUB_OFFLINE=1`) never goes further.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import Any, Mapping

from absl import logging
import ml_collections

from diffusion_jax import models
from diffusion_jax.convert import diffusers_config
from diffusion_jax.convert import diffusers_weights

# hub name -> the experiment config file (under configs/) of its dataset.
RELEASED = {
    "google/ddpm-cifar10-32": "cifar10.py",
    **{f"google/ddpm{ema}-{name}-256": f"{config}.py"
       for ema in ("", "-ema")
       for name, config in (("celebahq", "celebahq256"), ("church", "lsun_church256"),
                            ("bedroom", "lsun_bedroom256"), ("cat", "lsun_cat256"))},
}
_CONFIG_FILES = ["config.json", "unet/config.json", "scheduler_config.json",
                 "scheduler/scheduler_config.json", "model_index.json"]
_PATTERNS = {"safetensors": _CONFIG_FILES + ["diffusion_pytorch_model.safetensors",
                                             "unet/diffusion_pytorch_model.safetensors"],
             "torch": _CONFIG_FILES + ["diffusion_pytorch_model.bin",
                                       "unet/diffusion_pytorch_model.bin"]}
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def is_hub_name(src: str) -> bool:
  """`owner/name` that is not a local path."""
  return (not os.path.exists(src)) and re.fullmatch(r"[\w.-]+/[\w.-]+", src) is not None


def hub_cache(cache_dir: str | None = None) -> str:
  """The hub cache in use: `cache_dir`, else huggingface_hub's (HF_HUB_CACHE/HF_HOME)."""
  if cache_dir:
    return cache_dir
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  return constants.HF_HUB_CACHE


def fetch(repo_id: str, cache_dir: str | None = None, offline: bool | None = None) -> str:
  """The local snapshot directory of a hub model: from the cache, else downloaded.

  Args:
    repo_id: e.g. "google/ddpm-cifar10-32".
    cache_dir: the hub cache (default: huggingface_hub's).
    offline: never use the network (default: the HF_HUB_OFFLINE environment variable).

  Raises:
    FileNotFoundError: not cached and offline or unreachable, naming the cache and the fix.
  """
  # pylint: disable-next=g-import-not-at-top
  from huggingface_hub import errors, snapshot_download
  cache = hub_cache(cache_dir)
  if offline is None:
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
  missing = (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError)
  try:
    path = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    if diffusers_weights.is_diffusers_source(path):
      logging.info("%s: using the cached snapshot %s", repo_id, path)
      return path
  except missing:
    pass
  fix = (f"(It is read as a hub name because no local path {repo_id!r} exists.) "
         f"Run the same command once with internet access (the download resumes where "
         f"it stopped), or copy the folder models--{repo_id.replace('/', '--')} of a hub "
         f"cache that has it into {cache} (or point --hub_cache / HF_HUB_CACHE at such a "
         f"cache), or download the model folder and pass --src DIR.")
  if offline:
    raise FileNotFoundError(f"{repo_id} is not in the Hugging Face cache {cache} and the "
                            f"network is off (offline). {fix}")
  try:
    path = snapshot_download(repo_id, cache_dir=cache,
                             allow_patterns=_PATTERNS["safetensors"])
    if not diffusers_weights.is_diffusers_source(path):
      path = snapshot_download(repo_id, cache_dir=cache, allow_patterns=_PATTERNS["torch"])
  except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
    raise FileNotFoundError(f"The hub has no model {repo_id!r} that can be read "
                            f"({type(e).__name__}); released names: "
                            f"{sorted(RELEASED)}.") from e
  except (OSError, errors.HfHubHTTPError) as e:
    raise FileNotFoundError(f"Could not download {repo_id} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}) and it is not in "
                            f"the cache {cache}. {fix}") from e
  if not diffusers_weights.is_diffusers_source(path):
    raise FileNotFoundError(f"{repo_id} has no diffusers UNet2DModel weights "
                            f"(diffusion_pytorch_model.safetensors or .bin).")
  return path


def _read_json(directory: str, names: list[str]) -> dict[str, Any] | None:
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      with open(path) as f:
        return json.load(f)
  return None


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(
      "config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("")


def apply_scheduler(config: ml_collections.ConfigDict,
                    scheduler: Mapping[str, Any] | None) -> list[str]:
  """Sets `config.diffusion` from a diffusers DDPMScheduler config; returns what changed.

  Raises:
    ValueError: for a schedule or parameterization this project does not have.
  """
  if not scheduler:
    return []
  d = config.diffusion
  wanted = {"num_timesteps": int(scheduler.get("num_train_timesteps", d.num_timesteps)),
            "beta_start": float(scheduler.get("beta_start", d.beta_start)),
            "beta_end": float(scheduler.get("beta_end", d.beta_end))}
  schedule = scheduler.get("beta_schedule", "linear")
  kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
  variances = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall",
               "fixed_small_log": "fixedsmall", "fixed_large_log": "fixedlarge"}
  predictions = {"epsilon": "eps", "sample": "x_start", "v_prediction": "v"}
  if schedule not in kinds or scheduler.get("trained_betas"):
    raise ValueError(f"The model's scheduler uses beta_schedule={schedule!r} (or trained "
                     f"betas); supported: {sorted(kinds)}. Pass --config explicitly.")
  wanted["beta_schedule"] = kinds[schedule]
  if scheduler.get("variance_type") in variances:
    wanted["model_var_type"] = variances[scheduler["variance_type"]]
  if scheduler.get("prediction_type", "epsilon") not in predictions:
    raise ValueError(f"Unknown prediction_type {scheduler.get('prediction_type')!r}.")
  wanted["model_mean_type"] = predictions[scheduler.get("prediction_type", "epsilon")]
  changed = []
  for key, value in wanted.items():
    if d[key] != value:
      changed.append(f"diffusion.{key}: {d[key]!r} -> {value!r}")
      d[key] = value
  return changed


def infer_config(model_dir: str, name: str = "", configs_dir: str = CONFIGS_DIR
                 ) -> tuple[ml_collections.ConfigDict, str]:
  """The experiment config of a diffusers model directory, from its own config.json.

  The U-Net's architecture picks the config files of `configs_dir` that build the same
  network; a released name picks its dataset's among them (the four 256x256 datasets
  share one network), and the scheduler config (if any) sets the diffusion.

  Returns:
    (config, a description of the choice, e.g. "configs/cifar10.py").

  Raises:
    ValueError: no config.json, no or several matching configs (pass --config).
  """
  cfg = _read_json(model_dir, ["config.json", "unet/config.json"])
  if cfg is None:
    raise ValueError(f"{model_dir} has no config.json (nor unet/config.json); pass "
                     "--config.")
  found = diffusers_config.unet_config_from_diffusers(cfg)
  if not os.path.isdir(configs_dir):
    raise ValueError(f"No experiment configs at {configs_dir} to match the model against; "
                     "pass --config.")
  matches = {}
  for path in sorted(glob.glob(os.path.join(configs_dir, "*.py"))):
    config = _load_config_file(path)
    if not diffusers_config.architecture_differences(found,
                                                     models.unet_config_from(config)):
      matches[os.path.basename(path)] = config
  if name in RELEASED:
    if RELEASED[name] not in matches:
      raise ValueError(f"{name}'s config.json does not describe the network of "
                       f"configs/{RELEASED[name]}; pass --config.")
    chosen = RELEASED[name]
  elif len(matches) == 1:
    chosen = next(iter(matches))
  else:
    raise ValueError(
        f"The model's network ({found.image_size}x{found.image_size}, ch {found.ch}, "
        f"ch_mult {found.ch_mult}) matches "
        f"{'none' if not matches else sorted(matches)} of the configs in {configs_dir}; "
        "pass --config.")
  config = matches[chosen]
  changed = apply_scheduler(config, _read_json(
      model_dir, ["scheduler_config.json", "scheduler/scheduler_config.json"]))
  if changed:
    logging.info("From the model's scheduler config: %s", "; ".join(changed))
  return config, os.path.join(os.path.basename(configs_dir), chosen)
