"""The probability-flow ODE likelihood vs closed forms for Gaussian data.

Data: x_0 ~ N(m, Sigma) over d = 8 dimensions with a full covariance (so that the drift's
Jacobian is not diagonal and Hutchinson's estimate has a variance). With the exact score,
the marginal at time t is N(a m, a^2 Sigma + (1 - a^2) I), a^2 = alpha_bar(t), and the
continuous alpha_bar of the paper's linear schedule is score_sde's VP SDE:
log alpha_bar(t) = -(t^2 (b1 - b0) / 2 + t b0), b0 = 0.1, b1 = 20, written here
independently of the package.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import ddpm_reference as ref
from diffusion_jax.diffusion import ode_likelihood

T = 1000
SHAPE = (2, 2, 2)
DIM = 8
_rng = np.random.default_rng(0)
MEAN = 0.3 * _rng.standard_normal(DIM)
_A = _rng.standard_normal((DIM, DIM))
SIGMA = 0.5 * (_A @ _A.T) / DIM + 0.1 * np.eye(DIM)
LAM, Q = np.linalg.eigh(SIGMA)


def log_abar(t):
  return -(0.5 * t**2 * (20.0 - 0.1) + 0.1 * t)


def exact_eps_fn(x, label):
  """E[eps | x_t] = sqrt(1 - a^2) (a^2 Sigma + (1 - a^2) I)^-1 (x - a m)."""
  dtype = x.dtype
  lab = log_abar(label.astype(dtype) / (T - 1)).reshape(-1, 1)  # [N, 1]
  ab = jnp.exp(lab)
  flat = x.reshape(x.shape[0], DIM) - jnp.sqrt(ab) * jnp.asarray(MEAN, dtype)
  q = jnp.asarray(Q, dtype)
  coef = jnp.sqrt(1 - ab) / (ab * jnp.asarray(LAM, dtype) + 1 - ab)  # [N, d]
  return ((flat @ q) * coef @ q.T).reshape(x.shape)


def closed_log_density(z, t):
  """log N(z; a m, a^2 Sigma + (1 - a^2) I) of flat z [N, d] at time t (float64)."""
  ab = math.exp(log_abar(t))
  lam = ab * LAM + 1 - ab
  proj = (z - math.sqrt(ab) * MEAN) @ Q
  return -0.5 * (np.sum(proj**2 / lam, axis=1) + np.sum(np.log(lam))
                 + DIM * math.log(2 * math.pi))


def _vp():
  return ode_likelihood.vp_time(ref.betas("linear", T))


def test_continuous_time_view():
  vp = _vp()
  t = np.array([0.0, 1e-5, 0.123, 0.5, 0.77701, 1.0])
  # The linear schedule is score_sde's VP SDE: beta(t) = 0.1 + t (20 - 0.1).
  np.testing.assert_allclose(ode_likelihood.beta_at(vp, jnp.asarray(t, jnp.float32)),
                             0.1 + t * 19.9, rtol=1e-5)
  np.testing.assert_allclose(ode_likelihood.log_alpha_bar_at(vp, jnp.asarray(t)),
                             log_abar(t), rtol=1e-5, atol=1e-9)
  # Any schedule: beta is the piecewise-linear interpolation of T beta_i at i / (T - 1).
  betas = ref.betas("cosine", 50)
  vp = ode_likelihood.vp_time(betas)
  knots = np.arange(50) / 49
  interp = lambda s: np.interp(s, knots, 50 * betas)
  for s in (0.01, 0.3, 0.61, 0.999):
    want = -integrate.quad(interp, 0, s, points=knots[knots < s], limit=200)[0]
    with jax.enable_x64(True):
      got = float(ode_likelihood.log_alpha_bar_at(vp, jnp.asarray(s, jnp.float64)))
    assert got == pytest.approx(want, rel=1e-9), s
  with pytest.raises(ValueError, match="T >= 2"):
    ode_likelihood.vp_time(np.array([0.1]))


def test_parameterizations_give_the_same_noise():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3,) + SHAPE), jnp.float32)
  lab = jnp.asarray(-0.7, jnp.float32)
  eps = exact_eps_fn(x, jnp.full((3,), 500.0))
  a, s = jnp.exp(0.5 * lab), jnp.sqrt(1 - jnp.exp(lab))
  x0 = (x - s * eps) / a
  v = a * eps - s * x0
  for kind, out in (("eps", eps), ("x_start", x0), ("v", v)):
    got = ode_likelihood.eps_from_output(out, x, lab, model_mean_type=kind,
                                         model_var_type="fixedlarge")
    np.testing.assert_allclose(got, eps, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="no continuous-time"):
    ode_likelihood.eps_from_output(eps, x, lab, model_mean_type="mean",
                                   model_var_type="fixedlarge")


def _data(n, seed):
  flat = MEAN + np.random.default_rng(seed).standard_normal((n, DIM)) @ (
      Q * np.sqrt(LAM)).T
  return flat


@functools.partial(jax.jit, static_argnames=("trace",))
def _solve(z, vectors, trace):
  return ode_likelihood.log_likelihood(exact_eps_fn, _vp(), z, vectors, trace=trace)


def _check_against_closed_form(out, flat):
  """(ODE estimate with the true prior density at x(1), closed form at t_min)."""
  x1 = np.asarray(out["x1"], np.float64).reshape(len(flat), DIM)
  delta = np.asarray(out["delta_logp"], np.float64).mean(1)
  return closed_log_density(x1, 1.0) + delta, closed_log_density(flat, 1e-5)


@pytest.mark.parametrize("x64", [True, False])
def test_exact_trace_matches_the_closed_form(x64):
  flat = _data(4, 2)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    out = jax.device_get(_solve(jnp.asarray(flat.reshape((4,) + SHAPE), dtype), None,
                                trace="exact"))
  assert np.all(out["success"]) and np.all(out["num_steps"] > 5)
  got, want = _check_against_closed_form(out, flat)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # With the N(0, I) prior (what is reported) only the prior's mismatch remains.
  np.testing.assert_allclose(out["logp"], want, rtol=2e-3)
  np.testing.assert_allclose(out["logp"], out["prior_logp"] + out["delta_logp"][:, 0],
                             rtol=1e-6)


def test_hutchinson_is_unbiased_within_three_standard_errors():
  n, probes = 64, 2
  flat = _data(n, 3)
  z = jnp.asarray(flat.reshape((n,) + SHAPE), jnp.float32)
  keys = jax.random.split(jax.random.key(4), n)
  spread = {}
  for kind in ("rademacher", "gaussian"):
    vectors = jax.vmap(lambda k: ode_likelihood.probes(k, kind, probes, SHAPE,
                                                       jnp.float32))(keys)
    out = jax.device_get(_solve(z, vectors, trace=kind))
    assert np.all(out["success"])
    got, want = _check_against_closed_form(out, flat)
    diff = got - want
    stderr = diff.std(ddof=1) / math.sqrt(n)
    assert stderr > 1e-3  # the estimate really is random
    assert abs(diff.mean()) < 3 * stderr, (kind, diff.mean(), stderr)
    spread[kind] = diff.std()
  # Rademacher probes have the smaller variance (no diagonal contribution).
  assert spread["rademacher"] < spread["gaussian"]


def test_dequantization_and_bits():
  x = jnp.asarray([0, 255, 17], jnp.uint8)
  u = jnp.asarray([0.0, 0.999, 0.5], jnp.float32)
  np.testing.assert_allclose(ode_likelihood.dequantize(x, u),
                             [2 * 0 / 256 - 1, 2 * 255.999 / 256 - 1, 2 * 17.5 / 256 - 1],
                             rtol=1e-6)
  # A uniform density on [-1, 1)^d (log p = -d log 2) is 8 bits/dim on 256 levels.
  assert float(ode_likelihood.bits_per_dim(jnp.asarray(-5 * math.log(2.0)), 5)) == \
      pytest.approx(8.0)


def test_settings_errors():
  with pytest.raises(ValueError, match="divergence"):
    ode_likelihood.check_settings("hutch", 1, "dopri5", 1e-5, 1e-5, 1e-5)
  with pytest.raises(ValueError, match="solver"):
    ode_likelihood.check_settings("exact", 1, "euler", 1e-5, 1e-5, 1e-5)
  with pytest.raises(ValueError, match="num_probes"):
    ode_likelihood.check_settings("gaussian", 0, "dopri5", 1e-5, 1e-5, 1e-5)
  with pytest.raises(ValueError, match="t_min"):
    ode_likelihood.check_settings("exact", 1, "dopri5", 1e-5, 1e-5, 0.0)
  with pytest.raises(ValueError, match="probes"):
    ode_likelihood.log_likelihood(exact_eps_fn, _vp(), jnp.zeros((2,) + SHAPE), None,
                                  trace="gaussian")
