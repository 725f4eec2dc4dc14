"""Classifier-free guidance in the compiled samplers (`diffusion.guidance`, `sampling`).

* Scale 0 is the unconditional sampler and scale 1 the conditional one, bit for bit, and
  any other scale makes one batched network call (both branches) per step.
* With the Bayes-optimal predictors of a two-class Gaussian mixture, x_0 | c ~ N(m_c, s^2)
  with p(c) = 1/2 (the conditional one per class, the unconditional one for the mixture,
  both in closed form), a guided DPM-Solver++(2M) sample follows the guided probability-
  flow ODE: each sample is the ODE solution from the same x_T, solved here in float64 by
  SciPy in DDIM's variables (d(x / sqrt(abar)) / d sigma = eps(x), sigma^2 = (1 - abar) /
  abar), and the means at scales 0 and 1 are the mixture's and the class's (closed forms).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import integrate
from scipy import stats

from diffusion_jax import config_base
from diffusion_jax import models
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion import schedules
from diffusion_jax import streams

MEANS = np.array([-0.6, 0.4])
STD = 0.3


def _config(sampler="dpmpp_2m", steps=50, scale=1.0, labels="balanced", size=1,
            channels=1, classes=2):
  config = config_base.get_base_config()
  config.data.image_size, config.data.channels = size, channels
  config.model.num_classes = classes
  config.diffusion.num_timesteps = 1000
  config.sampling.sampler, config.sampling.num_steps = sampler, steps
  config.sampling.guidance_scale, config.sampling.labels = scale, labels
  config.sampling.clip_denoised = False
  return config


@dataclasses.dataclass
class _MixtureModel:
  """`apply` of the Bayes-optimal eps predictors: class c (labels 0, 1) or the mixture
  (the null label 2); counts the batch size of every traced call."""
  abar: np.ndarray
  calls: list = dataclasses.field(default_factory=list)

  def apply(self, variables, x, t, train=False, y=None):
    del variables, train
    self.calls.append(x.shape[0])
    # Fractional timesteps (the ODE solvers' grid): log abar interpolated linearly.
    log_abar = jnp.asarray(np.log(self.abar), jnp.float32)
    a = jnp.exp(jnp.interp(t.astype(jnp.float32), jnp.arange(log_abar.shape[0],
                                                              dtype=jnp.float32),
                           log_abar))[:, None, None, None]
    v = a * STD**2 + 1.0 - a
    means = jnp.asarray(MEANS, jnp.float32)
    eps = [(x - jnp.sqrt(a) * m) * jnp.sqrt(1.0 - a) / v for m in means]
    log_w = [-(x - jnp.sqrt(a) * m) ** 2 / (2 * v) for m in means]
    r0 = jax.nn.sigmoid(log_w[0] - log_w[1])
    mixture = r0 * eps[0] + (1.0 - r0) * eps[1]
    y = y[:, None, None, None]
    return jnp.where(y == 0, eps[0], jnp.where(y == 1, eps[1], mixture))


def _abar(config):
  return np.cumprod(1.0 - sampling.betas_of(config))


def _sample(config, indices, model=None):
  mesh = sharding.make_mesh(jax.devices()[:1])
  schedule = schedules.make_schedule(sampling.betas_of(config))
  model = model or _MixtureModel(_abar(config))
  fn = sampling.make_sample_fn(model, schedule, config, mesh)
  return np.asarray(fn({}, jnp.asarray(indices, jnp.int32))), model


def test_scales_zero_and_one_are_the_plain_samplers_bitwise():
  config = _config(steps=20)
  indices = np.arange(16)
  schedule = schedules.make_schedule(sampling.betas_of(config))
  run = sampling.build_sampler(config, schedule)
  base = streams.stream_key(config.seed, streams.SAMPLE)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices))
  model = _MixtureModel(_abar(config))
  labels = indices % 2
  for scale, y in ((0.0, np.full(16, 2)), (1.0, labels)):
    want = jax.jit(lambda k, y=y: run(
        lambda x, t: model.apply({}, x, t, y=jnp.asarray(y, jnp.int32)), k))(keys)
    got, _ = _sample(_config(steps=20, scale=scale), indices)
    np.testing.assert_array_equal(got, np.asarray(want))


def test_guidance_is_one_batched_call_per_step():
  got, model = _sample(_config(steps=10, scale=3.0), np.arange(4))
  assert model.calls == [8]  # traced once in the loop body, on [x, x]: batch 2B
  assert np.all(np.isfinite(got))
  assert sampling.network_calls(_config(steps=10, scale=3.0)) == 20
  assert sampling.network_calls(_config(steps=10, scale=1.0)) == 10


def _ode_reference(config, x_T, label, scale):
  """Each x_T's guided probability-flow ODE solution at sigma = 0 (float64, SciPy)."""
  abar_T = _abar(config)[-1]
  sigma_T = np.sqrt((1 - abar_T) / abar_T)

  def eps(x, sigma):
    a = 1.0 / (1.0 + sigma**2)
    v = a * STD**2 + 1.0 - a
    each = [(x - np.sqrt(a) * m) * np.sqrt(1 - a) / v for m in MEANS]
    w = np.stack([stats.norm.logpdf(x, np.sqrt(a) * m, np.sqrt(v)) for m in MEANS])
    r = np.exp(w - np.logaddexp(w[0], w[1]))
    mixture = r[0] * each[0] + r[1] * each[1]
    return scale * each[label] + (1 - scale) * mixture

  def rhs(sigma, y):  # y = x / sqrt(abar)
    return eps(y / np.sqrt(1.0 + sigma**2), sigma)

  solved = integrate.solve_ivp(rhs, (sigma_T, 0.0), x_T / np.sqrt(abar_T), rtol=1e-10,
                               atol=1e-10, method="DOP853")
  return solved.y[:, -1]


def test_guided_samples_follow_the_guided_ode_and_the_closed_form_means():
  n = 512
  indices = np.arange(n)
  for scale in (0.0, 1.0, 3.0):
    config = _config(steps=100, scale=scale, labels="1")
    got, _ = _sample(config, indices)
    base = streams.stream_key(config.seed, streams.SAMPLE)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices))
    x_T = np.asarray(randomness.per_example_normal(keys, 1000, (1, 1, 1), jnp.float32),
                     np.float64).reshape(-1)
    want = _ode_reference(config, x_T, 1, scale)
    # DPM-Solver++(2M)'s discretization error at 100 steps: a few 1e-3 at most.
    assert np.max(np.abs(got.reshape(-1) - want)) < 5e-3, scale
    assert abs(got.mean() - want.mean()) < 1e-3, scale
    error = got.std() / np.sqrt(n)
    if scale == 1.0:  # the class's mean
      assert abs(got.mean() - MEANS[1]) < 4 * error
    if scale == 0.0:  # the mixture's mean
      assert abs(got.mean() - MEANS.mean()) < 4 * error
  # Guidance pushes away from the other class: the mean moves past the class's mean.
  assert want.mean() > MEANS[1] + 0.02


def test_labels_are_a_function_of_the_sample_index():
  config = _config(labels="balanced", classes=10)
  np.testing.assert_array_equal(sampling.sample_labels(config, np.arange(12)),
                                [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
  config.sampling.labels = "3,7"
  np.testing.assert_array_equal(sampling.sample_labels(config, np.arange(5)),
                                [3, 7, 3, 7, 3])
  for bad in ("12", "a,b", "-1"):
    config.sampling.labels = bad
    try:
      sampling.check_sampler(config)
    except ValueError as e:
      assert "sampling.labels" in str(e)
    else:
      raise AssertionError(bad)


def test_a_class_conditional_unet_samples_each_requested_class():
  """The real network: labels reach the class embedding inside the compiled sampler."""
  config = _config(sampler="ddim", steps=3, scale=2.0, labels="0,1", size=8, classes=2)
  config.model.ch, config.model.ch_mult = 16, (1,)
  config.model.attn_resolutions, config.model.num_groups = (), 4
  unet_config = models.unet_config_from(config)
  params = models.init_params(unet_config, jax.random.key(0))
  params = dict(params, class_embed=params["class_embed"] * 50.0)  # labels matter a lot
  model = models.UNet(unet_config)
  mesh = sharding.make_mesh(jax.devices()[:1])
  schedule = schedules.make_schedule(sampling.betas_of(config))
  fn = sampling.make_sample_fn(model, schedule, config, mesh)
  out = np.asarray(fn(params, jnp.arange(4, dtype=jnp.int32)))
  assert out.shape == (4, 8, 8, 1) and np.all(np.isfinite(out))
  # Samples 0 and 2 have class 0, 1 and 3 class 1; same class, other noise.
  assert not np.allclose(out[0], out[1])


def test_the_evaluation_jobs_model_function_guides_a_constant_label():
  """`EvalModel.model_fn(params, label, scale)`: the jobs that call the network directly
  (figures, bits/dim, inversion) get the guided combination for one label."""
  from diffusion_jax import ops  # pylint: disable=g-import-not-at-top
  from diffusion_jax.evaluation import restore  # pylint: disable=g-import-not-at-top
  config = _config(size=8, classes=3)
  config.model.ch, config.model.ch_mult = 16, (1,)
  config.model.attn_resolutions, config.model.num_groups = (), 4
  unet_config = models.unet_config_from(config)
  params = models.init_params(unet_config, jax.random.key(1))
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # a non-zero output layer
  model = models.UNet(unet_config)
  eval_model = restore.EvalModel(params=params, step=0, params_kind="ema", model=model,
                                 schedule=None, mesh=None, ops=ops.XLA)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  t = jnp.array([10, 500], jnp.int32)
  out = lambda y: model.apply({"params": params}, x, t, y=jnp.full((2,), y, jnp.int32))
  np.testing.assert_allclose(eval_model.model_fn(params, 1, 2.5)(x, t),
                             out(3) + 2.5 * (out(1) - out(3)), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(eval_model.model_fn(params)(x, t), out(3))  # unconditional
