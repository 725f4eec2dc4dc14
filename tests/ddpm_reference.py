"""Independent float64 NumPy reference of the DDPM formulas, for the tests only.

Written from the paper's equations (Ho et al. 2020, Eqs. 4, 6, 7, 11, 13), Nichol &
Dhariwal (2021) and Song et al. (2021), deliberately in other algebraic forms than the
package (Python loops over scalars for the schedule, Eq. 11 for the eps mean, variances
instead of log-variances in the KL, ...). Nothing here imports `diffusion_jax`.
"""

import math

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff.


def betas(name, T, b0=1e-4, b1=0.02):
  """Beta schedules, one Python float at a time."""
  out = []
  for i in range(T):
    if name == "linear":
      out.append(b0 + (b1 - b0) * i / (T - 1) if T > 1 else b0)
    elif name == "quad":
      r = math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (T - 1)
      out.append(r * r)
    elif name == "const":
      out.append(b1)
    elif name == "jsd":
      out.append(1.0 / (T - i))
    elif name in ("warmup10", "warmup50"):
      w = int(T * (0.1 if name == "warmup10" else 0.5))
      if i < w:
        out.append(b0 + (b1 - b0) * i / (w - 1) if w > 1 else b0)
      else:
        out.append(b1)
    elif name == "cosine":
      f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2)**2
      out.append(min(1.0 - f((i + 1) / T) / f(i / T), 0.999))
    else:
      raise KeyError(name)
  return np.array(out)


def _log(v):
  """log with IEEE limits: log(0) = -inf (jsd's last alpha-bar is exactly 0)."""
  return math.log(v) if v > 0 else -math.inf


def _recip_sqrt(v):
  return 1 / math.sqrt(v) if v > 0 else math.inf


def coefficients(beta):
  """Every schedule coefficient from the betas, via scalar loops."""
  T = len(beta)
  abar, prod = [], 1.0
  for b in beta:
    prod *= 1.0 - b
    abar.append(prod)
  c = {k: [] for k in (
      "betas", "log_betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev",
      "log_alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
      "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
      "sqrt_recipm1_alphas_cumprod", "posterior_variance",
      "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
      "fixedlarge_variance", "fixedlarge_log_variance")}
  pv = [b * (1 - (abar[i - 1] if i else 1.0)) / (1 - abar[i]) for i, b in enumerate(beta)]
  for i, b in enumerate(beta):
    a, ap = abar[i], (abar[i - 1] if i else 1.0)
    c["betas"].append(b)
    c["log_betas"].append(math.log(b))
    c["alphas"].append(1 - b)
    c["alphas_cumprod"].append(a)
    c["alphas_cumprod_prev"].append(ap)
    c["log_alphas_cumprod"].append(_log(a))
    c["sqrt_alphas_cumprod"].append(math.sqrt(a))
    c["sqrt_one_minus_alphas_cumprod"].append(math.sqrt(1 - a))
    c["log_one_minus_alphas_cumprod"].append(math.log(1 - a))
    c["sqrt_recip_alphas_cumprod"].append(_recip_sqrt(a))
    c["sqrt_recipm1_alphas_cumprod"].append(math.sqrt(1 - a) * _recip_sqrt(a))
    c["posterior_variance"].append(pv[i])
    c["posterior_log_variance_clipped"].append(math.log(pv[max(i, 1)]))
    c["posterior_mean_coef1"].append(math.sqrt(ap) * b / (1 - a))
    c["posterior_mean_coef2"].append(math.sqrt(1 - b) * (1 - ap) / (1 - a))
    c["fixedlarge_variance"].append(b)
    c["fixedlarge_log_variance"].append(math.log(pv[1] if i == 0 else b))
  return {k: np.array(v) for k, v in c.items()}


def bshape(coef, t, x):
  """coef[t] broadcast over an example batch x [B, ...]."""
  return np.asarray(coef)[np.asarray(t)].reshape((-1,) + (1,) * (x.ndim - 1))


# --- Forward process, posterior, parameterizations ------------------------------------


def q_sample(c, x0, t, eps):
  return np.sqrt(bshape(c["alphas_cumprod"], t, x0)) * x0 + np.sqrt(
      1 - bshape(c["alphas_cumprod"], t, x0)) * eps


def posterior_mean(c, x0, xt, t):
  """Eq. 7."""
  b = bshape(c["betas"], t, xt)
  a = bshape(c["alphas_cumprod"], t, xt)
  ap = bshape(c["alphas_cumprod_prev"], t, xt)
  return (np.sqrt(ap) * b * x0 + np.sqrt(1 - b) * (1 - ap) * xt) / (1 - a)


def x0_from_eps(c, xt, t, eps):
  a = bshape(c["alphas_cumprod"], t, xt)
  return (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)


def eps_from_x0(c, xt, t, x0):
  a = bshape(c["alphas_cumprod"], t, xt)
  return (xt - np.sqrt(a) * x0) / np.sqrt(1 - a)


def v_of(c, x0, eps, t):
  a = bshape(c["alphas_cumprod"], t, x0)
  return np.sqrt(a) * eps - np.sqrt(1 - a) * x0


def x0_from_v(c, xt, t, v):
  # Solve [xt; v] = [[sa, s1], [-s1, sa]] [x0; eps] (a rotation) for x0.
  a = bshape(c["alphas_cumprod"], t, xt)
  return np.sqrt(a) * xt - np.sqrt(1 - a) * v


def x0_from_mean(c, xt, t, mean):
  b = bshape(c["betas"], t, xt)
  a = bshape(c["alphas_cumprod"], t, xt)
  ap = bshape(c["alphas_cumprod_prev"], t, xt)
  return (mean * (1 - a) - np.sqrt(1 - b) * (1 - ap) * xt) / (np.sqrt(ap) * b)


def mean_from_eps_eq11(c, xt, t, eps):
  """Eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
  b = bshape(c["betas"], t, xt)
  a = bshape(c["alphas_cumprod"], t, xt)
  return (xt - b / np.sqrt(1 - a) * eps) / np.sqrt(1 - b)


def log_variance(c, t, x, var_type, var_out=None):
  t = np.asarray(t)
  if var_type == "fixedlarge":
    v = np.where(t == 0, c["posterior_variance"][1], c["betas"][t])
    return np.broadcast_to(np.log(v).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
  small = np.log(c["posterior_variance"][np.maximum(t, 1)])
  small = np.broadcast_to(small.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
  if var_type == "fixedsmall":
    return small
  if var_type == "learned":
    return var_out
  frac = (var_out + 1) / 2
  return frac * np.log(bshape(c["betas"], t, x)) + (1 - frac) * small


def p_mean_var(c, output, xt, t, mean_type, var_type, clip):
  """The reverse Gaussian: (mean, log_variance, pred_x0)."""
  C = xt.shape[-1]
  mo, vo = (output[..., :C], output[..., C:]) if var_type.startswith("learned") else (
      output, None)
  logvar = log_variance(c, t, xt, var_type, vo)
  if mean_type == "eps":
    x0 = x0_from_eps(c, xt, t, mo)
  elif mean_type == "x_start":
    x0 = mo
  elif mean_type == "v":
    x0 = x0_from_v(c, xt, t, mo)
  else:
    x0 = x0_from_mean(c, xt, t, mo)
  if clip:
    x0 = np.clip(x0, -1, 1)
  if mean_type == "mean":
    mean = mo
  elif mean_type == "eps" and not clip:
    mean = mean_from_eps_eq11(c, xt, t, mo)
  else:
    mean = posterior_mean(c, x0, xt, t)
  return mean, logvar, x0


# --- Likelihood terms ------------------------------------------------------------------


def kl_gauss(m1, v1, m2, v2):
  """KL(N(m1, v1) || N(m2, v2)) from variances."""
  return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2)**2) / v2 - 1)


def cdf_tanh(x):
  return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def bin_log_prob(x, mean, std):
  """log P(bin of x): bins of width 2/255 around the 256 levels, edge bins to +-inf.

  Phi(z) = (1 + tanh(g(z))) / 2 = sigmoid(2 g(z)); a bin's probability is a difference
  of two sigmoids, taken on the side of the distribution where both are small (upper
  tail: 1 - Phi), so that no precision is lost to cancellation near Phi = 1.
  """
  g = lambda z: np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)
  sigmoid = lambda u: 1.0 / (1.0 + np.exp(-u))
  x, mean, std = np.broadcast_arrays(x, mean, std)
  lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
  hi = np.where(x > 0.999, np.inf, x + 1 / 255)
  with np.errstate(invalid="ignore", over="ignore"):
    a, b = g((hi - mean) / std), g((lo - mean) / std)
    upper = a + b > 0
    p = np.where(upper, sigmoid(-2 * b) - sigmoid(-2 * a), sigmoid(2 * a) - sigmoid(2 * b))
  return np.log(np.maximum(p, 1e-12))


def flat_mean(x):
  return x.reshape(x.shape[0], -1).mean(axis=1)


def vb_term(c, output, x0, xt, t, mean_type, var_type, clip=False):
  """L_{t-1} in bits/dim: decoder NLL at t == 0, KL elsewhere; and the predicted x0."""
  mean, logvar, px0 = p_mean_var(c, output, xt, t, mean_type, var_type, clip)
  tm = posterior_mean(c, x0, xt, t)
  tv = np.exp(log_variance(c, t, xt, "fixedsmall"))
  kl = flat_mean(kl_gauss(tm, tv, mean, np.exp(logvar)))
  nll = -flat_mean(bin_log_prob(x0, mean, np.exp(0.5 * logvar)))
  return np.where(np.asarray(t) == 0, nll, kl) / np.log(2), px0


def prior_bits(c, x0):
  a = c["alphas_cumprod"][-1]
  return flat_mean(kl_gauss(np.sqrt(a) * x0, 1 - a, 0.0, 1.0)) / np.log(2)


# --- Samplers -------------------------------------------------------------------------


def ancestral(c, model, x_T, noises, mean_type, var_type, clip, t_start=None, t_end=0,
              record_every=None):
  """Algorithm 2 from x_T, steps t_start..t_end; noises[t] is the noise added at step t."""
  x = x_T
  t_start = len(c["betas"]) - 1 if t_start is None else t_start
  records = []
  for t in range(t_start, t_end - 1, -1):
    tb = np.full(x.shape[0], t)
    mean, logvar, x0 = p_mean_var(c, model(x, tb), x, tb, mean_type, var_type, clip)
    if record_every and t % record_every == 0:
      records.append((t, x0, x))
    x = mean + (np.exp(0.5 * logvar) * noises[t] if t > 0 else 0.0)
  return (x, records) if record_every else x


def ddim(c, model, x_T, noises, seq, eta, mean_type, var_type, clip,
         eps_from_clipped=False):
  """Song et al. (2021) Eq. 12 over the increasing subsequence seq.

  x0 is clipped when `clip`; eps is that of the unclipped prediction (diffusers'
  DDIMScheduler default) or, with `eps_from_clipped`, of the clipped x0.
  """
  x = x_T
  abar = c["alphas_cumprod"]
  for j in range(len(seq) - 1, -1, -1):
    t = seq[j]
    ap = abar[seq[j - 1]] if j > 0 else 1.0
    tb = np.full(x.shape[0], t)
    out = model(x, tb)
    _, _, x0_raw = p_mean_var(c, out, x, tb, mean_type, var_type, False)
    x0 = np.clip(x0_raw, -1.0, 1.0) if clip else x0_raw
    eps = eps_from_x0(c, x, tb, x0 if eps_from_clipped else x0_raw)
    sigma = eta * math.sqrt((1 - ap) / (1 - abar[t]) * (1 - abar[t] / ap))
    x = math.sqrt(ap) * x0 + math.sqrt(max(1 - ap - sigma**2, 0.0)) * eps
    if eta:
      x = x + sigma * noises[t]
  return x


# --- Analytic-DPM (Bao et al. 2022), in the paper's general form ----------------------


def analytic_chain(abar, tau):
  """Per step of the subsequence tau (paper's n over the chain): the generalized forward
  process with lambda_n^2 = beta_tilde_n = beta_bar_{n-1} / beta_bar_n * beta_n (Eq. 3 and
  the DDPM special case), one Python float at a time.

  Returns a list of dicts with lam2 (lambda^2), x0_coef and xt_coef of
  mu_tilde(x_n, x_0) = sqrt(abar_{n-1}) x_0 + sqrt(bbar_{n-1} - lambda^2)
  (x_n - sqrt(abar_n) x_0) / sqrt(bbar_n), and the Thm. 1 factor
  (sqrt(bbar_n / alpha_n) - sqrt(bbar_{n-1} - lambda^2))^2.
  """
  steps = []
  for k, t in enumerate(tau):
    a_n = float(abar[t])
    a_p = float(abar[tau[k - 1]]) if k else 1.0
    alpha = a_n / a_p
    bb_n, bb_p = 1.0 - a_n, 1.0 - a_p
    lam2 = bb_p / bb_n * (1.0 - alpha)
    root = math.sqrt(max(bb_p - lam2, 0.0))
    steps.append({
        "lam2": lam2,
        "x0_coef": math.sqrt(a_p) - root * math.sqrt(a_n / bb_n),
        "xt_coef": root / math.sqrt(bb_n),
        "factor": (math.sqrt(bb_n / alpha) - root)**2,
        "alpha": alpha, "abar": a_n, "abar_prev": a_p,
    })
  return steps


def analytic_variance(abar, tau, gamma, lo=-1.0, hi=1.0):
  """Thm. 1's sigma*^2 = lambda^2 + factor (1 - Gamma), and Thm. 2's bounds for data in
  [lo, hi]: lambda^2 <= sigma*^2 <= lambda^2 + min(factor, (x0 coefficient)^2
  ((hi - lo) / 2)^2). Returns (unclipped, lower, upper) lists."""
  unclipped, lower, upper = [], [], []
  for s, t in zip(analytic_chain(abar, tau), tau):
    unclipped.append(s["lam2"] + s["factor"] * (1.0 - float(gamma[t])))
    lower.append(s["lam2"])
    upper.append(s["lam2"] + min(s["factor"], s["x0_coef"]**2 * ((hi - lo) / 2)**2))
  return np.array(unclipped), np.array(lower), np.array(upper)
