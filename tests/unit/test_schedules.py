"""Beta schedules and derived coefficients against the scalar-loop float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax.diffusion import schedules

NAMES = ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine")
FIELDS = schedules.Schedule._fields


def max_rel(actual, expected):
  """Largest elementwise relative error; exact zeros and infinities of `expected` must be
  matched exactly."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  exact = (expected == 0) | ~np.isfinite(expected)
  np.testing.assert_array_equal(actual[exact], expected[exact])
  return np.max(np.abs(actual[~exact] - expected[~exact]) / np.abs(expected[~exact]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1000, 37])
def test_betas_match_reference(name, T):
  betas = schedules.get_beta_schedule(name, T, 1e-4, 0.02)
  assert betas.dtype == np.float64 and betas.shape == (T,)
  assert max_rel(betas, ref.betas(name, T)) <= 1e-12


def test_schedule_endpoints():
  linear = schedules.get_beta_schedule("linear", 1000)
  assert linear[0] == 1e-4 and linear[-1] == 0.02
  jsd = schedules.get_beta_schedule("jsd", 10)
  np.testing.assert_allclose(jsd, [1 / 10, 1 / 9, 1 / 8, 1 / 7, 1 / 6, 1 / 5, 1 / 4, 1 / 3,
                                   1 / 2, 1], rtol=1e-15)
  warm = schedules.get_beta_schedule("warmup10", 1000, 1e-4, 0.02)
  assert warm[0] == 1e-4 and warm[99] == 0.02 and np.all(warm[100:] == 0.02)
  assert np.all(np.diff(warm[:100]) > 0)
  cosine = schedules.get_beta_schedule("cosine", 1000)
  assert cosine[-1] == 0.999 and np.all(cosine <= 0.999)  # The cap binds at the end.
  assert np.all(np.diff(cosine) > 0)


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_float64_match_reference(name):
  betas = schedules.get_beta_schedule(name, 1000)
  expected = ref.coefficients(ref.betas(name, 1000))
  with jax.enable_x64(True):
    sched = schedules.make_schedule(betas, jnp.float64)
    for field in FIELDS:
      value = getattr(sched, field)
      assert value.dtype == jnp.float64, field
      assert max_rel(value, expected[field]) <= 1e-10, field


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_float32_are_rounded_float64(name):
  betas = schedules.get_beta_schedule(name, 1000)
  expected = ref.coefficients(ref.betas(name, 1000))
  sched = schedules.make_schedule(betas)
  for field in FIELDS:
    value = getattr(sched, field)
    assert value.dtype == jnp.float32, field
    # Cast once from float64: at most half an ulp (plus the float64 noise) from the truth.
    assert max_rel(value, expected[field]) <= ref.U32 * (1 + 1e-6), field


def test_official_conventions():
  betas = schedules.get_beta_schedule("linear", 1000)
  c = schedules.schedule_coefficients_f64(betas)
  assert c["alphas_cumprod_prev"][0] == 1.0
  assert c["posterior_variance"][0] == 0.0
  assert c["posterior_log_variance_clipped"][0] == c["posterior_log_variance_clipped"][1]
  assert c["fixedlarge_log_variance"][0] == np.log(c["posterior_variance"][1])
  np.testing.assert_array_equal(c["fixedlarge_log_variance"][1:], np.log(betas[1:]))
  np.testing.assert_array_equal(c["fixedlarge_variance"], betas)


def test_jsd_last_step_destroys_data():
  c = schedules.schedule_coefficients_f64(schedules.get_beta_schedule("jsd", 50))
  assert c["alphas_cumprod"][-1] == 0.0
  assert np.isinf(c["sqrt_recip_alphas_cumprod"][-1])
  for field, value in c.items():
    assert np.all(np.isfinite(value[:-1])), field


def test_schedule_is_a_frozen_pytree():
  sched = schedules.make_schedule(schedules.get_beta_schedule("linear", 100))
  assert sched.num_timesteps == 100 and sched.dtype == jnp.float32
  assert len(jax.tree.leaves(sched)) == len(FIELDS)
  with pytest.raises(AttributeError):
    sched.betas = sched.alphas
  doubled = jax.jit(lambda s: jax.tree.map(lambda a: 2 * a, s))(sched)
  assert isinstance(doubled, schedules.Schedule)
  np.testing.assert_array_equal(doubled.betas, 2 * sched.betas)


def test_float64_needs_x64():
  betas = schedules.get_beta_schedule("linear", 10)
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="jax_enable_x64"):
      schedules.make_schedule(betas, jnp.float64)


def test_bad_arguments():
  with pytest.raises(ValueError, match="Unknown beta schedule 'lin'"):
    schedules.get_beta_schedule("lin", 10)
  with pytest.raises(ValueError, match="positive integer"):
    schedules.get_beta_schedule("linear", 0)
  with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
    schedules.get_beta_schedule("linear", 10, beta_start=0.0)
  with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
    schedules.get_beta_schedule("const", 10, beta_end=1.5)
  with pytest.raises(ValueError, match="float dtype"):
    schedules.make_schedule(np.full(5, 0.1), jnp.int32)
