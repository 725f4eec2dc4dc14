"""Forward process, posterior, parameterizations and p(x_{t-1} | x_t) vs the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import schedules

T = 1000
MEAN_TYPES = process.MEAN_TYPES
VAR_TYPES = process.VAR_TYPES


def rel_err(actual, expected):
  """Norm-wise relative error max|a - e| / max|e|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def assert_f32_close(actual, expected, magnitude, c=8.0):
  """|a - e| <= c u M elementwise: the forward error bound of a float32 evaluation whose
  terms have absolute size M (u = 2^-24), so only rounding can explain the difference."""
  err = np.abs(np.asarray(actual, np.float64) - expected)
  bound = c * ref.U32 * np.asarray(magnitude) + 1e-30
  assert np.all(err <= bound), np.max(err / bound)


@functools.lru_cache(maxsize=None)
def coefs():
  return ref.coefficients(ref.betas("linear", T))


def data(seed=0, batch=T):
  """One example per timestep: x0 on the 256-level grid, noise, t = 0..T-1."""
  rng = np.random.default_rng(seed)
  x0 = np.round(rng.uniform(-1, 1, (batch, 2, 2, 3)) * 127.5) / 127.5
  eps = rng.standard_normal((batch, 2, 2, 3))
  t = np.arange(batch) % T
  return x0, eps, t


def sched(dtype):
  return schedules.make_schedule(schedules.get_beta_schedule("linear", T), dtype)


def test_forward_and_posterior_float64():
  x0, eps, t = data()
  c = coefs()
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    xt = process.q_sample(s, x0, t, eps)
    assert xt.dtype == jnp.float64
    assert rel_err(xt, ref.q_sample(c, x0, t, eps)) <= 1e-10
    mean, var, logvar = process.q_mean_variance(s, x0, t)
    assert rel_err(mean, np.sqrt(ref.bshape(c["alphas_cumprod"], t, x0)) * x0) <= 1e-10
    assert rel_err(var, 1 - ref.bshape(c["alphas_cumprod"], t, x0)) <= 1e-10
    assert rel_err(logvar, np.log(1 - ref.bshape(c["alphas_cumprod"], t, x0))) <= 1e-10
    xt = np.asarray(xt)
    pm, pv, plv = process.q_posterior_mean_variance(s, x0, xt, t)
    assert rel_err(pm, ref.posterior_mean(c, x0, xt, t)) <= 1e-10
    assert rel_err(pv, ref.bshape(c["posterior_variance"], t, x0)) <= 1e-10
    assert rel_err(plv, ref.log_variance(c, t, x0, "fixedsmall")[:, :1, :1, :1]) <= 1e-10


def test_forward_and_posterior_float32():
  x0, eps, t = data()
  x0, eps = x0.astype(np.float32), eps.astype(np.float32)
  c = coefs()
  s = sched(jnp.float32)
  xt = process.q_sample(s, x0, t, eps)
  assert xt.dtype == jnp.float32
  sa = np.sqrt(ref.bshape(c["alphas_cumprod"], t, x0))
  s1 = np.sqrt(1 - ref.bshape(c["alphas_cumprod"], t, x0))
  assert_f32_close(xt, ref.q_sample(c, x0, t, eps), np.abs(sa * x0) + np.abs(s1 * eps))
  xt = np.asarray(xt)
  pm, _, _ = process.q_posterior_mean_variance(s, x0, xt, t)
  c1 = ref.bshape(c["posterior_mean_coef1"], t, x0)
  c2 = ref.bshape(c["posterior_mean_coef2"], t, x0)
  assert_f32_close(pm, ref.posterior_mean(c, x0, xt, t), np.abs(c1 * x0) + np.abs(c2 * xt))


def test_conversions_float64():
  x0, eps, t = data(1)
  c = coefs()
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    xt = ref.q_sample(c, x0, t, eps)
    v = ref.v_of(c, x0, eps, t)
    mean = ref.posterior_mean(c, x0, xt, t)
    # Off-manifold inputs too: the conversions are affine maps, not only identities.
    other = np.random.default_rng(2).standard_normal(x0.shape)
    checks = [
        (process.predict_xstart_from_eps(s, xt, t, other), ref.x0_from_eps(c, xt, t, other)),
        (process.predict_eps_from_xstart(s, xt, t, other), ref.eps_from_x0(c, xt, t, other)),
        (process.predict_xstart_from_v(s, xt, t, other), ref.x0_from_v(c, xt, t, other)),
        (process.predict_eps_from_v(s, xt, t, v), eps),
        (process.get_v(s, x0, eps, t), v),
        (process.predict_xstart_from_mean(s, xt, t, other),
         ref.x0_from_mean(c, xt, t, other)),
        (process.predict_xstart_from_mean(s, xt, t, mean), x0),
    ]
    for i, (actual, expected) in enumerate(checks):
      assert actual.dtype == jnp.float64
      assert rel_err(actual, expected) <= 1e-10, i


def true_output(c, mean_type, x0, xt, t, eps):
  return {"eps": eps, "x_start": x0, "v": ref.v_of(c, x0, eps, t),
          "mean": ref.posterior_mean(c, x0, xt, t)}[mean_type]


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_true_noise_reconstructs_x0_float64(mean_type):
  """Seed 000's exploration 2: the true target recovers x_0, eps and mu-tilde exactly."""
  x0, eps, t = data(3)
  c = coefs()
  xt = ref.q_sample(c, x0, t, eps)
  out = true_output(c, mean_type, x0, xt, t, eps)
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    for var_type in ("fixedlarge", "learned_range"):
      model_out = out if var_type == "fixedlarge" else np.concatenate([out, 0 * out], -1)
      p = process.p_mean_variance(s, model_out, xt, t, model_mean_type=mean_type,
                                    model_var_type=var_type)
      assert p.pred_xstart.dtype == jnp.float64
      assert rel_err(p.pred_xstart, x0) <= 1e-10
      assert rel_err(p.pred_eps, eps) <= 1e-10
      assert rel_err(p.mean, ref.posterior_mean(c, x0, xt, t)) <= 1e-10
      target = process.training_target(s, mean_type, x0, xt, t, eps)
      assert rel_err(target, out) <= 1e-10


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
def test_true_noise_reconstructs_x0_float32(mean_type):
  x0, eps, t = data(4)
  c = coefs()
  x0, eps = x0.astype(np.float32), eps.astype(np.float32)
  xt = ref.q_sample(c, x0, t, eps).astype(np.float32)
  out = true_output(c, mean_type, x0, xt, t, eps).astype(np.float32)
  p = process.p_mean_variance(sched(jnp.float32), out, xt, t, model_mean_type=mean_type,
                                model_var_type="fixedsmall")
  assert p.pred_xstart.dtype == jnp.float32
  g = lambda name: ref.bshape(c[name], t, x0)
  sra, srm1 = g("sqrt_recip_alphas_cumprod"), g("sqrt_recipm1_alphas_cumprod")
  sa, s1 = g("sqrt_alphas_cumprod"), g("sqrt_one_minus_alphas_cumprod")
  a, o = np.abs, np.asarray(out, np.float64)
  # The exact x0 of the float32 inputs, and the size of the terms of each formula.
  x0_exact = {"eps": ref.x0_from_eps(c, xt, t, o), "x_start": o,
              "v": ref.x0_from_v(c, xt, t, o), "mean": ref.x0_from_mean(c, xt, t, o)}
  m_x0 = {"eps": a(sra * xt) + a(srm1 * o), "x_start": a(o), "v": a(sa * xt) + a(s1 * o),
          "mean": (a(o) + a(g("posterior_mean_coef2") * xt)) / g("posterior_mean_coef1")}
  assert_f32_close(p.pred_xstart, x0_exact[mean_type], m_x0[mean_type])
  eps_exact = ref.eps_from_x0(c, xt, t, x0_exact[mean_type])
  m_eps = {"eps": a(o), "v": a(s1 * xt) + a(sa * o)}.get(
      mean_type, (a(sra * xt) + a(x0_exact[mean_type]) + m_x0[mean_type]) / srm1)
  assert_f32_close(p.pred_eps, eps_exact, m_eps)
  # And x0 itself to within that bound plus the rounding of the float32 inputs.
  in_round = {"eps": a(srm1 * eps), "x_start": a(x0), "v": a(s1 * o),
              "mean": a(o) / g("posterior_mean_coef1")}[mean_type] + a(sra * xt)
  assert_f32_close(p.pred_xstart, x0, m_x0[mean_type] + in_round)


def model_outputs(x, t, var_type):
  """A deterministic nonlinear 'network' output (mean part, then variance part)."""
  w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)
  mean = w * np.tanh(x) + 0.1 * x
  if var_type == "learned":
    return np.concatenate([mean, -4.0 + np.tanh(x)], -1)
  if var_type == "learned_range":
    return np.concatenate([mean, np.tanh(0.7 * x)], -1)
  return mean


@pytest.mark.parametrize("mean_type", MEAN_TYPES)
@pytest.mark.parametrize("var_type", VAR_TYPES)
def test_p_mean_variance_float64(mean_type, var_type):
  x0, eps, t = data(5)
  c = coefs()
  xt = ref.q_sample(c, x0, t, eps)
  out = model_outputs(xt, t, var_type)
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    for clip in (False, True):
      p = process.p_mean_variance(s, out, xt, t, model_mean_type=mean_type,
                                    model_var_type=var_type, clip_denoised=clip)
      mean, logvar, x0_hat = ref.p_mean_var(c, out, xt, t, mean_type, var_type, clip)
      assert p.mean.dtype == jnp.float64 and p.mean.shape == xt.shape
      assert rel_err(p.mean, mean) <= 1e-10
      assert rel_err(p.log_variance, logvar) <= 1e-10
      # As the official code, the fixed variances are beta_t and the unclipped beta-tilde
      # (0 at t = 0); only the log-variances carry the t = 0 choices.
      variance = {"fixedlarge": ref.bshape(c["betas"], t, xt),
                  "fixedsmall": ref.bshape(c["posterior_variance"], t, xt)}.get(
                      var_type, np.exp(logvar))
      assert rel_err(p.variance, np.broadcast_to(variance, xt.shape)) <= 1e-10
      assert rel_err(p.pred_xstart, x0_hat) <= 1e-10
      assert rel_err(p.pred_eps, ref.eps_from_x0(c, xt, t, x0_hat)) <= 1e-10


def test_p_mean_variance_eps_float32_matches_eq11():
  x0, eps, t = data(6)
  c = coefs()
  xt = ref.q_sample(c, x0, t, eps).astype(np.float32)
  out = model_outputs(xt, t, "fixedlarge").astype(np.float32)
  p = process.p_mean_variance(sched(jnp.float32), out, xt, t, model_mean_type="eps",
                                model_var_type="fixedlarge")
  assert p.mean.dtype == jnp.float32
  g = lambda name: ref.bshape(c[name], t, xt)
  m_x0 = np.abs(g("sqrt_recip_alphas_cumprod") * xt) + np.abs(
      g("sqrt_recipm1_alphas_cumprod") * out)
  m_mean = g("posterior_mean_coef1") * m_x0 + np.abs(g("posterior_mean_coef2") * xt)
  x64 = np.asarray(xt, np.float64), np.asarray(out, np.float64)
  assert_f32_close(p.mean, ref.mean_from_eps_eq11(c, x64[0], t, x64[1]), m_mean)
  np.testing.assert_allclose(p.log_variance, ref.log_variance(c, t, xt, "fixedlarge"),
                             rtol=2 * ref.U32)


def test_learned_range_endpoints():
  s = sched(jnp.float32)
  t = jnp.array([0, 1, 500, 999])
  x = jnp.zeros((4, 1, 1, 1))
  for v, field in ((-1.0, "posterior_log_variance_clipped"), (1.0, "log_betas")):
    _, logvar = process.model_variance(s, jnp.full_like(x, v), x, t, "learned_range")
    np.testing.assert_array_equal(logvar[:, 0, 0, 0], getattr(s, field)[t])


def test_functions_commute_with_jit_and_vmap():
  x0, eps, t = data(7, batch=64)
  c = coefs()
  xt = ref.q_sample(c, x0, t, eps)
  out = model_outputs(xt, t, "learned")
  # float64, so that fusion differences between the three programs stay far below 1e-12.
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    f = lambda o, x, tt: process.p_mean_variance(
        s, o, x, tt, model_mean_type="v", model_var_type="learned", clip_denoised=True)
    eager = f(out, xt, t)
    jitted = jax.jit(f)(out, xt, t)
    # vmap over a leading axis that splits the batch in 8 groups of 8.
    split = lambda a: a.reshape((8, 8) + a.shape[1:])
    vmapped = jax.vmap(f)(split(out), split(xt), split(t))
    for e, j, v in zip(eager, jitted, vmapped):
      assert rel_err(j, e) <= 1e-12
      assert rel_err(v.reshape(e.shape), e) <= 1e-12


def test_errors_name_the_problem():
  s = sched(jnp.float32)
  x = jnp.zeros((2, 4, 4, 3))
  t = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match=r"2x the input channels"):
    process.p_mean_variance(s, x, x, t, model_mean_type="eps", model_var_type="learned")
  with pytest.raises(ValueError, match=r"expected \(2, 4, 4, 3\)"):
    process.p_mean_variance(s, jnp.zeros((2, 4, 4, 6)), x, t, model_mean_type="eps",
                              model_var_type="fixedsmall")
  with pytest.raises(ValueError, match="Unknown model_mean_type 'xprev'"):
    process.p_mean_variance(s, x, x, t, model_mean_type="xprev",
                              model_var_type="fixedsmall")
  with pytest.raises(ValueError, match="Unknown model_var_type"):
    process.p_mean_variance(s, x, x, t, model_mean_type="eps", model_var_type="small")
  with pytest.raises(TypeError, match="Timesteps must be integers"):
    process.q_sample(s, x, jnp.zeros((2,)), x)
  with pytest.raises(ValueError, match="noise shape"):
    process.q_sample(s, x, t, x[:1])
