"""`sampling.variance=analytic`: the ancestral samplers take the chain's Analytic-DPM
variances (here: the wiring and the order of the steps, checked with variances whose
effect is known: the chain's own posterior variances reproduce "fixedsmall")."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import config_base
from diffusion_jax import sampling
from diffusion_jax import streams
from diffusion_jax.diffusion import respacing
from diffusion_jax.diffusion import schedules


def _config(sampler, steps, variance="model", var_type="fixedsmall"):
  config = config_base.get_base_config()
  config.data.image_size, config.data.channels = 2, 1
  config.diffusion.num_timesteps = 100
  config.diffusion.model_var_type = var_type
  config.sampling.sampler, config.sampling.num_steps = sampler, steps
  config.sampling.variance = variance
  config.sampling.clip_denoised = False
  return config


def _model_fn(x, t):  # any smooth eps prediction of x_t and t
  return 0.3 * jnp.tanh(x) + 0.01 * t.astype(jnp.float32)[:, None, None, None]


def _run(config, variances=None):
  schedule = schedules.make_schedule(sampling.betas_of(config))
  run = sampling.build_sampler(config, schedule, variances)
  base = streams.stream_key(0, streams.SAMPLE)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(8))
  return np.asarray(jax.jit(lambda k: run(_model_fn, k))(keys))


@pytest.mark.parametrize("sampler,steps", [("respaced", 10), ("ancestral", 100)])
def test_the_chains_posterior_variances_reproduce_fixedsmall(sampler, steps):
  config = _config(sampler, steps)
  chain = sampling.chain_timesteps(config)
  assert chain.shape == (steps,) and np.all(np.diff(chain) > 0)
  small = respacing.respace(sampling.betas_of(config), chain).schedule
  variances = np.asarray(small.posterior_variance, np.float64)
  variances[0] = np.exp(np.asarray(small.posterior_log_variance_clipped)[0])  # unused
  want = _run(_config("respaced", steps, var_type="fixedsmall"))
  got = _run(_config(sampler, steps, variance="analytic", var_type="fixedlarge"), variances)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Other variances give other samples (the variances are used, in their order).
  other = _run(_config(sampler, steps, variance="analytic"), variances[::-1].copy())
  assert np.abs(other - want).max() > 1e-3


def test_analytic_variances_are_required_and_named():
  with pytest.raises(ValueError, match="--mode=eval_analytic"):
    _run(_config("respaced", 10, variance="analytic"))
  with pytest.raises(ValueError, match="ancestral samplers"):
    sampling.check_sampler(_config("ddim", 10, variance="analytic"))
  with pytest.raises(ValueError, match="sampling.variance"):
    sampling.check_sampler(_config("respaced", 10, variance="learned"))
  tag = sampling.tag(_config("respaced", 10, variance="analytic"))
  assert "_analytic" in tag and tag.startswith("respaced10") and tag.endswith("_seed0")


def _tag(sampler, steps, var_type):
  config = _config(sampler, steps, var_type=var_type)
  config.sampling.clip_denoised = True  # the default: no settings hash in the name
  return sampling.tag(config)


def test_sample_sets_of_the_chains_variances_have_their_own_names():
  tags = {v: _tag("ancestral", 100, v) for v in ("fixedlarge", "fixedsmall", "learned")}
  assert tags == {"fixedlarge": "ancestral100_seed0",
                  "fixedsmall": "ancestral100_fixedsmall_seed0",
                  "learned": "ancestral100_learned_seed0"}
  assert _tag("respaced", 10, "fixedsmall") == _tag("respaced", 10, "fixedlarge").replace(
      "_seed0", "_fixedsmall_seed0")
  # The ODE solvers use the mean only: one name for either fixed variance.
  assert _tag("dpmpp_2m", 10, "fixedsmall") == _tag("dpmpp_2m", 10, "fixedlarge")
