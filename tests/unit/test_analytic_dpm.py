"""Analytic-DPM: coefficients and variances vs the paper's general formulas (float64
NumPy, `ddpm_reference`), Gamma and the optimal variance on Gaussian data vs closed forms,
and the K-step chain bound vs a float64 reference loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax.diffusion import analytic_dpm
from diffusion_jax.diffusion import schedules

T = 1000
M, S = 0.3, 0.5  # Gaussian data N(M, S^2) per dimension.


def _abar(beta=("linear", T)):
  return np.cumprod(1.0 - ref.betas(*beta))


def test_full_chain_is_the_schedule():
  c = ref.coefficients(ref.betas("linear", T))
  chain = analytic_dpm.chain_coefficients(c["alphas_cumprod"], np.arange(T))
  np.testing.assert_allclose(chain.posterior_variance, c["posterior_variance"], rtol=1e-12)
  np.testing.assert_allclose(chain.coef1, c["posterior_mean_coef1"], rtol=1e-12)
  np.testing.assert_allclose(chain.coef2, c["posterior_mean_coef2"], rtol=1e-12)
  np.testing.assert_allclose(chain.betas, c["betas"], rtol=1e-9)
  np.testing.assert_allclose(analytic_dpm.fixed_log_variance(chain, "fixedsmall"),
                             c["posterior_log_variance_clipped"], rtol=1e-10)
  np.testing.assert_allclose(analytic_dpm.fixed_log_variance(chain, "fixedlarge"),
                             c["fixedlarge_log_variance"], rtol=1e-10)


@pytest.mark.parametrize("beta", [("linear", T), ("cosine", 200)])
def test_respaced_variances_match_the_paper_formulas(beta):
  abar = _abar(beta)
  num_t = len(abar)
  rng = np.random.default_rng(0)
  tau = np.sort(rng.choice(np.arange(1, num_t), 16, replace=False))
  tau = np.concatenate([[0], tau])
  gamma = rng.uniform(0.0, 1.05, num_t)  # also past the bounds on both sides
  chain = analytic_dpm.chain_coefficients(abar, tau)
  steps = ref.analytic_chain(abar, tau)
  np.testing.assert_allclose(chain.coef1, [s["x0_coef"] for s in steps], rtol=1e-9,
                             atol=1e-15)
  np.testing.assert_allclose(chain.coef2, [s["xt_coef"] for s in steps], rtol=1e-9)
  out = analytic_dpm.optimal_variance(chain, gamma)
  unclipped, lower, upper = ref.analytic_variance(abar, tau, gamma)
  np.testing.assert_allclose(out["unclipped"], unclipped, rtol=1e-9, atol=1e-18)
  np.testing.assert_allclose(out["lower"], lower, rtol=1e-9, atol=1e-18)
  np.testing.assert_allclose(out["upper"], upper, rtol=1e-9)
  want = np.maximum(np.clip(unclipped, lower, upper), analytic_dpm.VARIANCE_FLOOR)
  np.testing.assert_allclose(out["variance"], want, rtol=1e-9)
  assert np.any(unclipped < lower) and np.any(unclipped > upper)  # both bounds used
  # The log-variances of the three choices, stacked in the asked order.
  lv = analytic_dpm.chain_log_variances(chain, ["analytic", "fixedlarge"], gamma)
  np.testing.assert_allclose(lv[0], np.log(want), rtol=1e-12)
  large = [s["alpha"] for s in steps]
  np.testing.assert_allclose(lv[1, 1:], np.log(1.0 - np.array(large[1:])), rtol=1e-9)
  np.testing.assert_allclose(lv[1, 0], np.log(steps[1]["lam2"]), rtol=1e-9)


def test_chain_errors():
  abar = _abar()
  with pytest.raises(ValueError, match="increase strictly"):
    analytic_dpm.chain_coefficients(abar, [0, 5, 5])
  with pytest.raises(ValueError, match="increase strictly"):
    analytic_dpm.chain_coefficients(abar, [0, T])
  with pytest.raises(ValueError, match="1 <= K <= T"):
    analytic_dpm.even_chain(T, 0)
  chain = analytic_dpm.chain_coefficients(abar, analytic_dpm.even_chain(T, 10))
  with pytest.raises(ValueError, match="one value per timestep"):
    analytic_dpm.optimal_variance(chain, np.ones(10))
  with pytest.raises(ValueError, match="run the analytic job"):
    analytic_dpm.chain_log_variances(chain, ["analytic"])
  np.testing.assert_array_equal(analytic_dpm.even_chain(T, T), np.arange(T))
  assert analytic_dpm.even_chain(T, 10)[[0, -1]].tolist() == [0, T - 1]


# --- Gaussian data: the Bayes-optimal predictor --------------------------------------


def gaussian_eps_model(alphas_cumprod, m=M, s=S):
  """E[eps | x_t] for x_0 ~ N(m, s^2): eps = sqrt(v) (x - a m) / (a^2 s^2 + v)."""
  abar = jnp.asarray(alphas_cumprod)

  def model_fn(x, t):
    ab = abar[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * m) / (ab * s**2 + 1 - ab)
  return model_fn


def reverse_variance(abar, tau, s=S):
  """Var(x_{tau_{k-1}} | x_{tau_k}) of Gaussian data, from the joint covariance of
  x_{tau_{k-1}} and x_{tau_k} (x_0 itself for k = 1)."""
  out = []
  for k, t in enumerate(tau):
    a_n, a_p = abar[t], (abar[tau[k - 1]] if k else 1.0)
    var_p = a_p * s**2 + 1 - a_p
    var_n = a_n * s**2 + 1 - a_n
    cov = np.sqrt(a_n / a_p) * var_p  # x_n = sqrt(alpha) x_p + noise
    out.append(var_p - cov**2 / var_n)
  return np.array(out)


@pytest.fixture(scope="module")
def gaussian_gamma():
  """Gamma of the optimal predictor over 400 images of 16x16 (d N = 1e5 per timestep)."""
  s = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
  n, size = 400, 16
  x0 = M + S * jax.random.normal(jax.random.key(7), (n, size, size, 1))
  keys = jax.random.split(jax.random.key(8), n)
  fn = jax.jit(functools.partial(analytic_dpm.eps_norm_terms, model_mean_type="eps",
                                 model_var_type="fixedlarge", t_chunk=10),
               static_argnums=0)
  terms = np.asarray(fn(gaussian_eps_model(s.alphas_cumprod), s, x0, keys), np.float64)
  return terms.mean(0), terms.std(0, ddof=1) / np.sqrt(n)


def test_gamma_of_the_optimal_predictor_is_the_closed_form(gaussian_gamma):
  gamma, stderr = gaussian_gamma
  abar = _abar()
  want = (1 - abar) / (abar * S**2 + 1 - abar)  # E[eps | x_t]^2 = v / (a^2 s^2 + v)
  z = (gamma - want) / stderr
  # 1000 timesteps: |z| < 5 fails with probability 6e-4 when the estimate is unbiased.
  assert np.max(np.abs(z)) < 5, (np.argmax(np.abs(z)), np.max(np.abs(z)))
  assert abs(np.mean(z)) < 5 / np.sqrt(10)  # no common bias (timesteps correlate)


@pytest.mark.parametrize("num_steps", [T, 50])
def test_optimal_variance_of_the_optimal_predictor_is_the_true_one(gaussian_gamma,
                                                                   num_steps):
  gamma, stderr = gaussian_gamma
  abar = _abar()
  chain = analytic_dpm.chain_coefficients(abar, analytic_dpm.even_chain(T, num_steps))
  got = analytic_dpm.optimal_variance(chain, gamma)
  want = reverse_variance(abar, chain.timesteps)
  # The tolerance from the sample count: 5 standard errors of Gamma through the linear
  # map to the variance, at most the width of the clipping interval (which holds `want`).
  slope = chain.betas**2 / (chain.alphas * (1 - chain.alphas_cumprod))
  tol = np.minimum(5 * slope * stderr[chain.timesteps], got["upper"] - got["lower"])
  assert np.all(want >= got["lower"] * (1 - 1e-12))
  assert np.all(want <= got["upper"] * (1 + 1e-12))
  assert np.max(tol / want) <= 0.01  # enough Monte Carlo samples for 1%
  err = np.abs(got["variance"] - want)
  assert np.all(err <= tol + 1e-12 * want), np.argmax(err / tol)


# --- The chain bound vs a float64 loop -----------------------------------------------


def _tiny_model(x, t):
  w = 0.5 + 0.4 * jnp.cos(t.astype(x.dtype)).reshape(-1, 1, 1, 1)
  return w * jnp.tanh(x) + 0.1 * x


def _np_tiny_model(x, t):
  w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)
  return w * np.tanh(x) + 0.1 * x


@functools.partial(jax.jit, static_argnums=(2,))
def _noise_at(keys, t, shape):
  """The documented noise: example b at timestep t uses fold_in(keys[b], t)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape))(keys)


@pytest.mark.parametrize("mean_type,clip,t_chunk", [("eps", False, 1), ("v", True, 3)])
def test_chain_bound_matches_float64_loop(mean_type, clip, t_chunk):
  beta = ("linear", 40, 1e-3, 0.2)
  c = ref.coefficients(ref.betas(*beta))
  s = schedules.make_schedule(schedules.get_beta_schedule(*beta))
  tau = np.array([0, 3, 9, 17, 30, 39])
  gamma = np.random.default_rng(1).uniform(0.2, 1.0, 40)
  chain = analytic_dpm.chain_coefficients(c["alphas_cumprod"], tau)
  lv = analytic_dpm.chain_log_variances(chain, ["fixedsmall", "fixedlarge", "analytic"],
                                        gamma)
  x0 = np.random.default_rng(2).integers(0, 256, (6, 4, 4, 2)) / 127.5 - 1.0
  keys = jax.random.split(jax.random.key(3), 6)
  out = jax.jit(lambda x, k: analytic_dpm.chain_bound(
      _tiny_model, s, x, k, chain, lv, model_mean_type=mean_type,
      model_var_type="fixedlarge", clip_denoised=clip, t_chunk=t_chunk))(
          jnp.asarray(x0, jnp.float32), keys)

  # Reference: the paper's generalized posterior with lambda^2 = beta_tilde of the chain.
  steps = ref.analytic_chain(c["alphas_cumprod"], tau)
  var = np.exp(lv)
  terms = np.zeros((6, 3, len(tau)))
  for k, (st, t) in enumerate(zip(steps, tau)):
    eps = np.asarray(_noise_at(keys, int(t), x0.shape[1:]), np.float64)
    tb = np.full(6, t)
    xt = ref.q_sample(c, x0, tb, eps)
    output = _np_tiny_model(xt, tb)
    x0_hat = (ref.x0_from_eps(c, xt, tb, output) if mean_type == "eps"
              else ref.x0_from_v(c, xt, tb, output))
    if clip:
      x0_hat = np.clip(x0_hat, -1, 1)
    true_mean = st["x0_coef"] * x0 + st["xt_coef"] * xt
    mean = st["x0_coef"] * x0_hat + st["xt_coef"] * xt
    for v in range(3):
      if k == 0:
        nll = -ref.flat_mean(ref.bin_log_prob(x0, mean, np.sqrt(var[v, 0])))
        terms[:, v, 0] = nll / np.log(2)
      else:
        kl = ref.kl_gauss(true_mean, st["lam2"], mean, var[v, k])
        terms[:, v, k] = ref.flat_mean(kl) / np.log(2)
  a = c["alphas_cumprod"][tau[-1]]
  prior = ref.flat_mean(ref.kl_gauss(np.sqrt(a) * x0, 1 - a, 0.0, 1.0)) / np.log(2)
  np.testing.assert_allclose(out["terms_bpd"], terms, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(out["prior_bpd"], prior, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out["total_bpd"], terms.sum(2) + prior[:, None], rtol=1e-4)


@pytest.mark.parametrize("num_steps", [T, 50])
def test_analytic_variance_tightens_the_gaussian_bound(gaussian_gamma, num_steps):
  """On quantized Gaussian data with the optimal predictor, the bound with the analytic
  variances is below the bounds with either fixed variance (paired: same noise)."""
  gamma, _ = gaussian_gamma
  s = schedules.make_schedule(schedules.get_beta_schedule("linear", T))
  abar = schedules.schedule_coefficients_f64(
      schedules.get_beta_schedule("linear", T))["alphas_cumprod"]
  chain = analytic_dpm.chain_coefficients(abar, analytic_dpm.even_chain(T, num_steps))
  lv = analytic_dpm.chain_log_variances(chain, ["fixedsmall", "fixedlarge", "analytic"],
                                        gamma)
  n = 48
  levels = np.round((M + S * np.random.default_rng(4).standard_normal((n, 4, 4, 1)) + 1)
                    * 127.5)
  x0 = jnp.asarray(np.clip(levels, 0, 255) / 127.5 - 1.0, jnp.float32)
  keys = jax.random.split(jax.random.key(5), n)
  total = np.asarray(jax.jit(lambda x, k: analytic_dpm.chain_bound(
      gaussian_eps_model(s.alphas_cumprod), s, x, k, chain, lv, model_mean_type="eps",
      model_var_type="fixedlarge", t_chunk=10)["total_bpd"])(x0, keys), np.float64)
  for fixed in (0, 1):
    diff = total[:, 2] - total[:, fixed]  # [n]
    stderr = diff.std(ddof=1) / np.sqrt(n)
    assert diff.mean() < -3 * stderr, (num_steps, fixed, diff.mean(), stderr)
