"""The one validation pass of a job's config: every check that needs no data and no
compilation, so that bad settings fail in seconds, before anything is written.

`validate_config` is called once at the start of training and of every evaluation job.
Every numeric field has a range (`RULES`); each error names the field, the value, the
range and, where it helps, the fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from jax.sharding import Mesh
import ml_collections

from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import schedules
from diffusion_jax.ops import policy


@dataclasses.dataclass(frozen=True)
class Rule:
  """The allowed values of one numeric field: `check(value)` and how to say it."""
  text: str
  check: Callable[[Any], bool]
  integer: bool = False
  allow_infinity: bool = False


def _at_least(low: int) -> Rule:
  return Rule(f"an integer >= {low}", lambda v: v >= low, integer=True)


def _positive() -> Rule:
  return Rule("> 0", lambda v: v > 0)


def _non_negative() -> Rule:
  return Rule(">= 0", lambda v: v >= 0)


def _unit_interval_open_right() -> Rule:
  return Rule("in [0, 1)", lambda v: 0 <= v < 1)


def _unit_interval_open_left() -> Rule:
  return Rule("in (0, 1]", lambda v: 0 < v <= 1)


# Every numeric field of the base config (`config_base`) and its range.
RULES: dict[str, Rule] = {
    "seed": _at_least(0),
    "data.image_size": _at_least(1),
    "data.channels": Rule("1 or 3", lambda v: v in (1, 3), integer=True),
    "model.ch": _at_least(4),
    "model.num_res_blocks": _at_least(1),
    "model.num_groups": _at_least(1),
    "model.dropout": _unit_interval_open_right(),
    "model.num_classes": _at_least(0),
    "diffusion.num_timesteps": _at_least(1),
    "diffusion.beta_start": _unit_interval_open_left(),
    "diffusion.beta_end": _unit_interval_open_left(),
    "diffusion.hybrid_lambda": _non_negative(),
    "training.batch_size": _at_least(1),
    "training.num_train_steps": _at_least(1),
    "training.log_every_steps": _at_least(1),
    "training.checkpoint_every_steps": _at_least(1),
    "training.checkpoint_every_minutes": _positive(),
    "training.snapshot_every_steps": _at_least(1),
    "training.sample_every_steps": _at_least(1),
    "training.num_sample_images": _at_least(1),
    "training.max_to_keep_preemption": _at_least(1),
    "training.label_dropout": _unit_interval_open_right(),
    "training.fid_every_steps": _at_least(0),
    "training.fid_num_samples": _at_least(2),
    "training.fid_num_steps": _at_least(1),
    "optim.learning_rate": _positive(),
    "optim.warmup_steps": _at_least(0),
    "optim.grad_clip_norm": _positive(),
    "optim.beta1": _unit_interval_open_right(),
    "optim.beta2": _unit_interval_open_right(),
    "optim.eps": _positive(),
    "optim.ema_decay": _unit_interval_open_right(),
    "sampling.num_steps": _at_least(1),
    "sampling.eta": _non_negative(),
    "sampling.guidance_scale": _non_negative(),
    "sampling.threshold_ratio": _unit_interval_open_right(),
    "sampling.threshold_max": Rule(">= 1", lambda v: v >= 1),
    "sampling.churn": _non_negative(),
    "sampling.churn_tmin": _non_negative(),
    "sampling.churn_tmax": Rule(">= 0 (inf: no upper limit)", lambda v: v >= 0,
                                allow_infinity=True),
    "sampling.churn_noise": _positive(),
    "sampling.karras_rho": _positive(),
    "sampling.invert_num_images": _at_least(1),
    "sampling.invert_fixed_point_iterations": _at_least(0),
    "sampling.num_samples": _at_least(1),
    "sampling.batch_size": _at_least(1),
    "sampling.shard_size": _at_least(1),
    "inpaint.num_images": _at_least(1),
    "inpaint.num_completions": _at_least(1),
    "inpaint.jump_length": _at_least(1),
    "inpaint.jump_n_sample": _at_least(1),
    "inpaint.batch_size": _at_least(1),
    "eval.checkpoint_step": _at_least(-1),
    "eval.bpd_batch_size": _at_least(1),
    "eval.bpd_num_images": Rule("-1 (the whole split) or an integer >= 1",
                                lambda v: v == -1 or v >= 1, integer=True),
    "eval.bpd_t_chunk": _at_least(1),
    "eval.fid_batch_size": _at_least(1),
    "eval.figure_rows": _at_least(1),
    "eval.figure_columns": _at_least(3),
    "eval.figure_num_images": _at_least(1),
    "eval.analytic_num_images": _at_least(2),
    "eval.analytic_batch_size": _at_least(1),
    "eval.analytic_t_chunk": _at_least(1),
    "eval.ode_num_probes": _at_least(1),
    "eval.ode_max_steps": _at_least(1),
    "eval.ode_rtol": _positive(),
    "eval.ode_atol": _positive(),
    "eval.ode_t_min": Rule("in (0, 1)", lambda v: 0 < v < 1),
    "eval.fid_reference_num_images": Rule("-1 (the whole split) or an integer >= 2",
                                          lambda v: v == -1 or v >= 2, integer=True),
    "eval.kid_subsets": _at_least(1),
    "eval.kid_subset_size": _at_least(2),
    "eval.pr_num_images": Rule("an integer >= 0 (0: off)", lambda v: v >= 0, integer=True),
}


def _get(config: ml_collections.ConfigDict, path: str):
  node = config
  for part in path.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for the first numeric field outside its range (`RULES`).

  Fields missing from `config` (an older config) are skipped.
  """
  for path, rule in RULES.items():
    value = _get(config, path)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{path}={value!r} must be a number ({rule.text}).")
    if isinstance(value, float) and (math.isnan(value) or (
        math.isinf(value) and not (rule.allow_infinity and value > 0))):
      raise ValueError(f"{path}={value!r} must be finite and {rule.text}.")
    if rule.integer and float(value) != int(value):
      raise ValueError(f"{path}={value!r} must be {rule.text}.")
    if not rule.check(value):
      raise ValueError(f"{path}={value!r} is out of range: it must be {rule.text}; set "
                       f"--config.{path}=... accordingly.")


def validate_config(config: ml_collections.ConfigDict, mesh: Mesh, *,
                    training: bool = True) -> None:
  """Raises ValueError naming the field and the fix for settings that cannot run.

  Checks every numeric range (`check_ranges`), the model (via `UNetConfig`), the kernel
  policy, the diffusion and loss names, the beta schedule, the sampler, the figure
  fractions and, for training, that the global training batch splits over the devices
  and processes (evaluation jobs check their own batch sizes against the mesh).
  """
  check_ranges(config)
  models.unet_config_from(config)
  policy.check_policy(str(config.model.get("kernels", "auto")))
  d = config.diffusion
  losses.check_loss_config(d.model_mean_type, d.model_var_type, d.loss_type)
  schedules.get_beta_schedule(d.beta_schedule, int(d.num_timesteps), float(d.beta_start),
                              float(d.beta_end))
  if training:
    sharding.check_batch_divisible(int(config.training.batch_size), mesh,
                                   "training.batch_size")
  fractions = tuple(config.eval.get("figure_t_fractions", ()))
  if any(not 0.0 < float(f) <= 1.0 for f in fractions):
    raise ValueError(f"eval.figure_t_fractions={fractions} must lie in (0, 1].")
  sampling.check_sampler(config)
