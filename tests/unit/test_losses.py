"""KL, discretized decoder, prior term and every training loss vs the float64 reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import special

import ddpm_reference as ref
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import losses
from diffusion_jax.diffusion import schedules

T = 1000


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@functools.lru_cache(maxsize=None)
def coefs():
  return ref.coefficients(ref.betas("linear", T))


def sched(dtype):
  return schedules.make_schedule(schedules.get_beta_schedule("linear", T), dtype)


def grid_data(seed, shape):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, shape) / 127.5 - 1.0


def test_normal_kl():
  rng = np.random.default_rng(0)
  m1, m2 = rng.standard_normal((2, 500))
  lv1, lv2 = rng.uniform(-8, 2, (2, 500))
  expected = ref.kl_gauss(m1, np.exp(lv1), m2, np.exp(lv2))
  with jax.enable_x64(True):
    actual = losses.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), m2, lv2)
    assert actual.dtype == jnp.float64 and rel_err(actual, expected) <= 1e-10
  f32 = [a.astype(np.float32) for a in (m1, lv1, m2, lv2)]
  actual = losses.normal_kl(*[jnp.asarray(a) for a in f32])
  assert actual.dtype == jnp.float32
  expected = ref.kl_gauss(f32[0], np.exp(f32[1].astype(np.float64)), f32[2],
                          np.exp(f32[3].astype(np.float64)))
  # Terms are at most exp(10) * (1 + (m1 - m2)^2): a few ulps of that size.
  size = 0.5 * (np.abs(lv1) + np.abs(lv2) + 1 + np.exp(lv1 - lv2) * (1 + (m1 - m2)**2) +
                (m1 - m2)**2 * np.exp(-lv2))
  assert np.all(np.abs(np.asarray(actual, np.float64) - expected) <= 8 * ref.U32 * size)


def bin_log_probs(mean, log_scale, dtype):
  """log P of all 256 levels for each (mean, log_scale) pair: [N, 256]."""
  levels = np.arange(256) / 127.5 - 1.0
  x = jnp.asarray(np.broadcast_to(levels, (len(mean), 256)), dtype)
  return losses.discretized_gaussian_log_likelihood(
      x, means=jnp.asarray(mean, dtype)[:, None], log_scales=jnp.asarray(log_scale,
                                                                         dtype)[:, None])


MEANS = np.array([0.0, 0.3, -0.99, 1.0, -1.2, 2.5, 0.5, 0.0, 0.017])
LOG_SCALES = np.array([-3.0, -5.0, -2.0, -6.0, -1.0, 0.0, 1.0, -7.9, -4.4])


def test_discretized_likelihood_matches_reference():
  levels = np.broadcast_to(np.arange(256) / 127.5 - 1.0, (len(MEANS), 256))
  expected = ref.bin_log_prob(levels, MEANS[:, None], np.exp(LOG_SCALES)[:, None])
  with jax.enable_x64(True):
    actual = bin_log_probs(MEANS, LOG_SCALES, jnp.float64)
    assert actual.dtype == jnp.float64
    # Compare where the probability is not floored at 1e-12.
    live = expected > np.log(1e-12)
    assert np.all(np.abs(np.asarray(actual)[live] - expected[live]) <=
                  1e-10 * np.abs(expected[live]) + 1e-12)


def test_decoder_probabilities_sum_to_one():
  p32 = np.exp(np.asarray(bin_log_probs(MEANS, LOG_SCALES, jnp.float32), np.float64))
  assert np.all(np.abs(p32.sum(axis=1) - 1) <= 1e-5), p32.sum(axis=1)
  with jax.enable_x64(True):
    p64 = np.exp(np.asarray(bin_log_probs(MEANS, LOG_SCALES, jnp.float64)))
  # Below the 1e-12 floor, a bin's probability is replaced by 1e-12: <= 256e-12 in all.
  assert np.all(np.abs(p64.sum(axis=1) - 1) <= 3e-10), p64.sum(axis=1)


def test_decoder_is_close_to_exact_gaussian_bins():
  """The official tanh CDF is within 2e-4 of the exact normal CDF, so is each bin."""
  levels = np.arange(256) / 127.5 - 1.0
  lo = np.where(levels < -0.999, -np.inf, levels - 1 / 255)
  hi = np.where(levels > 0.999, np.inf, levels + 1 / 255)
  with jax.enable_x64(True):
    p = np.exp(np.asarray(bin_log_probs(MEANS, LOG_SCALES, jnp.float64)))
  std = np.exp(LOG_SCALES)[:, None]
  exact = special.ndtr((hi - MEANS[:, None]) / std) - special.ndtr((lo - MEANS[:, None]) / std)
  assert np.max(np.abs(p - exact)) <= 4e-4
  assert np.all(np.argmax(p, axis=1) == np.argmax(exact, axis=1))


def test_prior_bpd_matches_reference_and_paper():
  x0 = grid_data(1, (256, 8, 8, 3))
  c = coefs()
  with jax.enable_x64(True):
    actual = losses.prior_bpd(sched(jnp.float64), x0)
    assert actual.dtype == jnp.float64 and rel_err(actual, ref.prior_bits(c, x0)) <= 1e-10
  l_t = np.asarray(losses.prior_bpd(sched(jnp.float32), x0.astype(np.float32)))
  np.testing.assert_allclose(l_t, ref.prior_bits(c, x0), rtol=1e-4)
  # The paper: L_T is about 1e-5 bits/dim with the linear schedule on [-1, 1] data.
  # For uniform levels, E[x^2] = 1/3 + 1/(3 * 255^2) ~ 1/3.
  assert 0.5e-5 < l_t.mean() < 2e-5
  a = c["alphas_cumprod"][-1]
  expected_mean = (0.5 * (-np.log(1 - a) - a + a * np.mean(x0**2))) / np.log(2)
  np.testing.assert_allclose(l_t.mean(), expected_mean, rtol=1e-3)


def np_model(x, t, var_type):
  w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)
  mean = w * np.tanh(x) + 0.1 * x
  extra = {"learned": -4.0 + np.tanh(x), "learned_range": np.tanh(0.7 * x)}
  return np.concatenate([mean, extra[var_type]], -1) if var_type in extra else mean


def jnp_model(params, var_type):
  a, b = params

  def model_fn(x, t):
    w = 0.5 + 0.4 * jnp.cos(t.astype(x.dtype)).reshape(-1, 1, 1, 1)
    mean = a * w * jnp.tanh(x) + 0.1 * x
    extra = {"learned": -4.0 + b * jnp.tanh(x), "learned_range": b * jnp.tanh(0.7 * x)}
    return jnp.concatenate([mean, extra[var_type]], -1) if var_type in extra else mean

  return model_fn


def ref_losses(c, x0, t, eps, mean_type, var_type, loss_type, lam):
  xt = ref.q_sample(c, x0, t, eps)
  out = np_model(xt, t, var_type)
  target = {"eps": eps, "x_start": x0, "v": ref.v_of(c, x0, eps, t),
            "mean": ref.posterior_mean(c, x0, xt, t)}[mean_type]
  mse = ref.flat_mean((target - out[..., :x0.shape[-1]])**2)
  vb, _ = ref.vb_term(c, out, x0, xt, t, mean_type, var_type)
  learned = var_type.startswith("learned")
  loss = {"mse": mse, "kl": vb, "hybrid": mse + lam * T * vb,
          "rescaled_mse": mse + T / 1000 * vb if learned else mse}[loss_type]
  return {"loss": loss, "mse": mse, "vb": vb}


def loss_data(seed, batch=64):
  rng = np.random.default_rng(seed)
  x0 = grid_data(seed, (batch, 4, 4, 3))
  eps = rng.standard_normal(x0.shape)
  t = np.concatenate([[0, 1, 2, T - 1], rng.integers(0, T, batch - 4)])
  return x0, t, eps


@pytest.mark.parametrize("mean_type", process.MEAN_TYPES)
@pytest.mark.parametrize("var_type", process.VAR_TYPES)
def test_training_losses_float64(mean_type, var_type):
  x0, t, eps = loss_data(2)
  c = coefs()
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    model = jnp_model((1.0, 1.0), var_type)
    for loss_type in losses.LOSS_TYPES:
      if loss_type == "mse" and var_type.startswith("learned"):
        continue
      out = losses.training_losses(model, s, x0, t, eps, model_mean_type=mean_type,
                                   model_var_type=var_type, loss_type=loss_type,
                                   hybrid_lambda=0.003)
      expected = ref_losses(c, x0, t, eps, mean_type, var_type, loss_type, 0.003)
      for key in ("loss", "mse", "vb"):
        assert out[key].dtype == jnp.float64 and out[key].shape == (64,)
        assert rel_err(out[key], expected[key]) <= 1e-10, (loss_type, key)


def test_training_losses_float32_path():
  x0, t, eps = loss_data(3)
  c = coefs()
  out = losses.training_losses(
      jnp_model((1.0, 1.0), "learned_range"), sched(jnp.float32), x0.astype(np.float32), t,
      eps.astype(np.float32), model_mean_type="eps", model_var_type="learned_range",
      loss_type="hybrid")
  expected = ref_losses(c, x0.astype(np.float32), t, eps.astype(np.float32), "eps",
                        "learned_range", "hybrid", 0.001)
  # The KL is a sum of O(1) terms per dim (log-variances, variance ratio, -1) that
  # cancel to ~1e-3 at large t: float32 leaves an absolute error of a few u there.
  for key in ("loss", "mse", "vb"):
    assert out[key].dtype == jnp.float32
    np.testing.assert_allclose(out[key], expected[key], rtol=2e-5, atol=32 * ref.U32,
                               err_msg=key)


def test_every_table2_cell_is_expressible():
  x0, t, eps = loss_data(4, batch=16)
  c = coefs()
  assert len(losses.TABLE2) == 6
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    for row, cfg in losses.TABLE2.items():
      losses.check_loss_config(**cfg)
      out = losses.training_losses(jnp_model((1.0, 1.0), cfg["model_var_type"]), s, x0, t,
                                   eps, **cfg)
      expected = ref_losses(c, x0, t, eps, cfg["model_mean_type"], cfg["model_var_type"],
                            cfg["loss_type"], 0.001)
      assert rel_err(out["loss"], expected["loss"]) <= 1e-10, row


def test_hybrid_stops_the_mean_gradient_of_the_bound():
  x0, t, eps = loss_data(5, batch=32)
  s = sched(jnp.float32)
  x0, eps = jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32)

  def total(params, loss_type, key="loss", lam=0.002):
    out = losses.training_losses(jnp_model(params, "learned_range"), s, x0, t, eps,
                                 model_mean_type="eps", model_var_type="learned_range",
                                 loss_type=loss_type, hybrid_lambda=lam)
    return jnp.mean(out[key])

  @jax.jit
  def gradients(params):
    return (jax.grad(total)(params, "hybrid"), jax.grad(total)(params, "kl", "mse"),
            jax.grad(total)(params, "kl"), jax.grad(total)(params, "rescaled_mse"),
            jax.grad(lambda p: total(p, "hybrid", lam=1e-3))(params))

  g_hybrid, g_mse, g_kl, g_rescaled, g_hybrid3 = gradients(
      (jnp.float32(0.9), jnp.float32(0.4)))
  assert np.all(np.isfinite(jax.tree.leaves((g_hybrid, g_mse, g_kl, g_rescaled, g_hybrid3))))
  np.testing.assert_allclose(g_hybrid[0], g_mse[0], rtol=1e-6)  # Mean: L_simple only.
  np.testing.assert_allclose(g_hybrid[1], 0.002 * T * g_kl[1], rtol=1e-5)  # Variance: L_vlb.
  assert abs(g_kl[0]) > 1e-3  # ... although the bound does depend on the mean.
  # rescaled_mse is the hybrid objective with lambda = 1e-3.
  np.testing.assert_allclose(g_rescaled, g_hybrid3, rtol=1e-6)


def test_training_losses_under_jit_vmap_and_8_device_sharding():
  x0, t, eps = loss_data(6, batch=16)
  x0, eps = x0.astype(np.float32), eps.astype(np.float32)
  s = sched(jnp.float32)

  def f(x, tt, e):
    return losses.training_losses(jnp_model((1.0, 1.0), "learned"), s, x, tt, e,
                                  model_mean_type="v", model_var_type="learned",
                                  loss_type="hybrid")

  plain = jax.device_get(jax.jit(f)(x0, t, eps))
  # vmap over 2 groups of 8 examples, each group spread over 8 devices.
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8
  sharding = NamedSharding(mesh, P(None, "batch"))
  put = lambda a: jax.device_put(a.reshape((2, 8) + a.shape[1:]), sharding)
  out = jax.jit(jax.vmap(f))(put(x0), put(t), put(eps))
  for key, value in plain.items():
    assert out[key].sharding.is_equivalent_to(sharding, 2), key
    np.testing.assert_allclose(np.asarray(out[key]).reshape(16), value, rtol=1e-6, err_msg=key)


def test_loss_config_errors():
  with pytest.raises(ValueError, match="no gradient to a learned variance"):
    losses.check_loss_config("eps", "learned", "mse")
  with pytest.raises(ValueError, match="Unknown loss_type 'l2'"):
    losses.check_loss_config("eps", "fixedlarge", "l2")
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="2x the input channels"):
    losses.training_losses(lambda x, t: x, sched(jnp.float32), x, jnp.zeros(2, jnp.int32), x,
                           model_mean_type="eps", model_var_type="learned", loss_type="kl")
