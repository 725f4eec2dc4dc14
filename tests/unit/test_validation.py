"""Config validation: every numeric field has a range, and each bad value is named.

The table of bad values below is written independently of `validation.RULES`: for each
field, values just outside the documented range (and, for integers, a non-integer). The
last test checks that every numeric field of the base config is covered by a rule.
"""

import math

import jax
import pytest

from diffusion_jax import config_base
from diffusion_jax import sharding
from diffusion_jax import validation

# field -> (bad values, a good value)
BAD = {
    "seed": ([-1], 3),
    "data.image_size": ([0, -4], 16),
    "data.channels": ([0, 2, 4], 1),
    "model.ch": ([0, 3], 64),
    "model.num_res_blocks": ([0], 1),
    "model.num_groups": ([0], 16),
    "model.dropout": ([-0.1, 1.0, 1.5], 0.3),
    "model.num_classes": ([-1], 10),
    "diffusion.num_timesteps": ([0, -10], 10),
    "diffusion.beta_start": ([0.0, -1e-4, 1.5], 1e-3),
    "diffusion.beta_end": ([0.0, 1.01], 0.01),
    "diffusion.hybrid_lambda": ([-0.001], 0.0),
    "training.batch_size": ([0, -8], 64),
    "training.num_train_steps": ([0, -1], 1),
    "training.log_every_steps": ([0], 1),
    "training.checkpoint_every_steps": ([0], 1),
    "training.checkpoint_every_minutes": ([0.0, -1.0, math.nan], 0.5),
    "training.snapshot_every_steps": ([0], 1),
    "training.sample_every_steps": ([0], 1),
    "training.num_sample_images": ([0], 1),
    "training.max_to_keep_preemption": ([0], 1),
    "training.label_dropout": ([-0.1, 1.0], 0.1),
    "training.fid_every_steps": ([-1], 500),
    "training.fid_num_samples": ([1, 0], 100),
    "training.fid_num_steps": ([0], 10),
    "optim.learning_rate": ([0.0, -2e-4, math.inf, math.nan], 1e-3),
    "optim.warmup_steps": ([-1], 0),
    "optim.grad_clip_norm": ([0.0, -1.0], 0.5),
    "optim.beta1": ([-0.1, 1.0], 0.0),
    "optim.beta2": ([1.0, 2.0], 0.99),
    "optim.eps": ([0.0, -1e-8], 1e-6),
    "optim.ema_decay": ([1.0, -0.5], 0.0),
    "sampling.num_steps": ([0], 1),
    "sampling.eta": ([-0.5], 1.0),
    "sampling.guidance_scale": ([-1.0], 3.0),
    "sampling.threshold_ratio": ([-0.1, 1.0], 0.995),
    "sampling.threshold_max": ([0.5, 0.0], 1.5),
    "sampling.churn": ([-1.0], 40.0),
    "sampling.churn_tmin": ([-0.1], 0.05),
    "sampling.churn_tmax": ([-1.0, -math.inf, math.nan], math.inf),
    "sampling.churn_noise": ([0.0], 1.003),
    "sampling.karras_rho": ([0.0, -7.0], 3.0),
    "sampling.invert_num_images": ([0], 4),
    "sampling.invert_fixed_point_iterations": ([-1], 0),
    "sampling.num_samples": ([0], 1),
    "sampling.batch_size": ([0], 8),
    "sampling.shard_size": ([0], 8),
    "inpaint.num_images": ([0], 2),
    "inpaint.num_completions": ([0], 2),
    "inpaint.jump_length": ([0], 2),
    "inpaint.jump_n_sample": ([0], 1),
    "inpaint.batch_size": ([0], 2),
    "eval.checkpoint_step": ([-2], 0),
    "eval.bpd_batch_size": ([0], 8),
    "eval.bpd_num_images": ([0, -2], -1),
    "eval.bpd_t_chunk": ([0], 2),
    "eval.fid_batch_size": ([0], 8),
    "eval.figure_rows": ([0], 1),
    "eval.figure_columns": ([2, 0], 3),
    "eval.figure_num_images": ([0], 1),
    "eval.analytic_num_images": ([1, 0], 2),
    "eval.analytic_batch_size": ([0], 8),
    "eval.analytic_t_chunk": ([0], 4),
    "eval.ode_num_probes": ([0], 2),
    "eval.ode_max_steps": ([0], 100),
    "eval.ode_rtol": ([0.0, -1e-5], 1e-3),
    "eval.ode_atol": ([0.0], 1e-3),
    "eval.ode_t_min": ([0.0, 1.0, -1e-5], 1e-3),
    "eval.fid_reference_num_images": ([0, 1, -2], -1),
    "eval.kid_subsets": ([0], 10),
    "eval.kid_subset_size": ([1, 0], 100),
    "eval.pr_num_images": ([-1], 0),
}
INTEGER_FIELDS = [f for f, (_, good) in BAD.items() if isinstance(good, int)]


def _config(field=None, value=None):
  config = config_base.get_base_config()
  config.training.batch_size = 8  # Divides the 8 test devices.
  if field is not None:
    section, _, name = field.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
      node = node[part]
    node[name] = value
  return config


@pytest.mark.parametrize("field,bad", [(f, v) for f, (values, _) in BAD.items()
                                       for v in values])
def test_each_bad_value_is_named_with_the_field(field, bad):
  with pytest.raises(ValueError, match=rf"{field.replace('.', '[.]')}=.*"):
    validation.check_ranges(_config(field, bad))


@pytest.mark.parametrize("field", list(BAD))
def test_the_good_value_passes(field):
  try:
    validation.check_ranges(_config(field, BAD[field][1]))
  except ValueError as e:
    pytest.fail(f"{field}={BAD[field][1]!r} was refused: {e}")


@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_integer_fields_refuse_fractions(field):
  config = _config()
  section, _, name = field.rpartition(".")
  node = config
  for part in filter(None, section.split(".")):
    node = node[part]
  with node.ignore_type():
    node[name] = BAD[field][1] + 0.5
  message = rf"{field.replace('.', '[.]')}=.*(integer|1 or 3)"
  with pytest.raises(ValueError, match=message):
    validation.check_ranges(config)


def test_every_numeric_field_of_the_base_config_has_a_rule_and_a_test():
  numeric = []

  def walk(prefix, node):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(f"{prefix}{key}.", value)
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        numeric.append(f"{prefix}{key}")

  walk("", config_base.get_base_config())
  assert set(numeric) <= set(validation.RULES), set(numeric) - set(validation.RULES)
  assert set(validation.RULES) == set(BAD), set(validation.RULES) ^ set(BAD)


def test_the_base_config_validates_and_a_bad_value_fails_the_whole_pass():
  mesh = sharding.make_mesh(jax.devices()[:1])
  validation.validate_config(_config(), mesh)
  with pytest.raises(ValueError, match="optim.learning_rate=0.0 is out of range"):
    validation.validate_config(_config("optim.learning_rate", 0.0), mesh)
