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


# --- Few-step ODE samplers (Lu et al. 2022, 2022b; Karras et al. 2022) ------------------
# A level is (alpha, sigma) with x = alpha x_0 + sigma eps; lambda = log(alpha / sigma).
# Written as exact integrals of the interpolating polynomial of the predictions in lambda
# (the papers' derivation), not in the solvers' coefficient form.


def level_of(abar, t):
  """(alpha, sigma) at a (fractional) timestep: log alpha_bar linear between integers."""
  log_a = float(np.interp(t, np.arange(len(abar)), np.log(abar)))
  return math.exp(0.5 * log_a), math.sqrt(1.0 - math.exp(log_a))


def predict_x0_eps(output, x, alpha, sigma, mean_type, clip=False, threshold=None):
  """x_0 and eps from a model output at level (alpha, sigma); x_0 clipped to [-1, 1] or
  dynamically thresholded (ratio, max) per example, eps then re-derived."""
  C = x.shape[-1]
  out = output[..., :C]
  if mean_type == "eps":
    x0, eps = (x - sigma * out) / alpha, out
  elif mean_type == "x_start":
    x0, eps = out, (x - alpha * out) / sigma
  else:  # v = alpha eps - sigma x_0, x = alpha x_0 + sigma eps (a rotation)
    x0, eps = alpha * x - sigma * out, sigma * x + alpha * out
  if threshold is not None:
    ratio, top = threshold
    flat = np.abs(x0.reshape(len(x0), -1))
    s = np.clip(np.quantile(flat, ratio, axis=1), 1.0, top)
    s = s.reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = np.clip(x0, -s, s) / s
  if clip:
    x0 = np.clip(x0, -1.0, 1.0)
  if clip or threshold is not None:
    eps = (x - alpha * x0) / sigma
  return x0, eps


def _moments(h, j_max, sign):
  """I_j = int_0^h exp(sign (u - h)) u^j du, j = 0..j_max (exp(-h) weight for sign +1:
  the data-prediction integral; sign -1: the noise-prediction one)."""
  out = []
  for j in range(j_max + 1):
    if sign > 0:  # int e^{u - h} u^j = u^j e^{u-h} | - j I_{j-1}
      out.append(h**j - (j * out[j - 1] if j else math.exp(-h)))
    else:  # int e^{h - u} u^j = -u^j e^{h-u} | + j I_{j-1}
      out.append(-h**j + (j * out[j - 1] if j else math.exp(h)))
  return out


def exp_integrator_step(x, lev_s, lev_t, nodes, values, kind):
  """x at level t from x at level s, the prediction (x_0 for kind "data", eps for
  "noise") replaced by the polynomial through (nodes: lambdas, values).

  data:  x_t = sigma_t / sigma_s x_s + sigma_t int_{lam_s}^{lam_t} e^lam p(lam) dlam
  noise: x_t = alpha_t / alpha_s x_s - alpha_t int e^-lam p(lam) dlam
  A noise-free level t (sigma_t = 0) takes the prediction at s (first order).
  """
  (a_s, s_s), (a_t, s_t) = lev_s, lev_t
  if s_t == 0.0:
    return values[0] if kind == "data" else (x - s_s * values[0]) / a_s
  lam_s, lam_t = math.log(a_s / s_s), math.log(a_t / s_t)
  h = lam_t - lam_s
  u = [n - lam_s for n in nodes]
  k = len(u)
  coef = np.linalg.solve(np.vander(np.array(u), k, increasing=True),
                         np.stack([v.reshape(-1) for v in values]))  # [k, D]
  if kind == "data":  # sigma_t e^{lam_s} int_0^h e^u p = alpha_t int_0^h e^{u - h} p
    moments = _moments(h, k - 1, +1)
    integral = a_t * sum(moments[j] * coef[j] for j in range(k))
    out = s_t / s_s * x.reshape(-1) + integral
  else:  # alpha_t e^{-lam_s} int_0^h e^{-u} p = sigma_t int_0^h e^{h - u} p
    moments = _moments(h, k - 1, -1)
    integral = s_t * sum(moments[j] * coef[j] for j in range(k))
    out = a_t / a_s * x.reshape(-1) - integral
  return out.reshape(x.shape)


def midpoint_step(x, lev_s, lev_t, m_s, lam_other, m_other, kind):
  """Lu et al.'s second-order "midpoint" form: the first-order step with the prediction
  m_s + (m_s - m_other) h / (2 (lam_s - lam_other)) (DPM-Solver-2, DPM-Solver++(2M))."""
  lam_s = math.log(lev_s[0] / lev_s[1])
  lam_t = math.log(lev_t[0] / lev_t[1])
  d1 = (m_s - m_other) * (lam_t - lam_s) / (lam_s - lam_other)
  return exp_integrator_step(x, lev_s, lev_t, [lam_s], [m_s + 0.5 * d1], kind)


def dpm_multistep(x, levels, predict, order, kind, solver="midpoint",
                  lower_order_final=True):
  """Multistep DPM-Solver(++) over levels [M + 1] ((alpha, sigma); the last may be
  noise-free); predict(x, i) -> prediction at level i. Orders: min(order, i + 1), the
  last two steps at most 1 and 2 when lower_order_final and M < 15, the step into a
  noise-free end first order. Returns the states at every level."""
  m_steps = len(levels) - 1
  lams = [math.log(a / s) if s > 0 else math.inf for a, s in levels]
  hist, states = [], [x]
  for i in range(m_steps):
    hist.append(predict(x, i))
    k = min(order, i + 1)
    if lower_order_final and m_steps < 15:
      k = min(k, 1 if i == m_steps - 1 else 2 if i == m_steps - 2 else k)
    if levels[i + 1][1] == 0.0:
      k = 1
    if k == 2 and solver == "midpoint":
      x = midpoint_step(x, levels[i], levels[i + 1], hist[-1], lams[i - 1], hist[-2], kind)
    else:
      x = exp_integrator_step(x, levels[i], levels[i + 1], lams[i - k + 1:i + 1][::-1],
                              hist[::-1][:k], kind)
    states.append(x)
  return states


def dpm_singlestep(x, levels, predict, groups, kind, solver="midpoint"):
  """Singlestep DPM-Solver(++): consecutive groups of grid intervals (sizes `groups`,
  summing to M), each from its start s with its intermediate levels on the grid. The
  state two intervals in is DPM-Solver-2 (midpoint) or the linear Taylor form (heun);
  three intervals in, Lu et al.'s DPM-Solver-3 update (midpoint: the linear polynomial
  through s and the second level) or the quadratic Taylor form (heun). "lu" (Lu et al.'s
  code): midpoint, but the second level of a group of three in the Taylor form. Returns
  the states at every level."""
  lams = [math.log(a / s) if s > 0 else math.inf for a, s in levels]
  states, g = [x], 0
  for k in groups:
    x_s, preds = x, [predict(x, g)]
    for j in range(1, k + 1):  # the state at level g + j
      lev_s, lev_t = levels[g], levels[g + j]
      if j == 1:
        x = exp_integrator_step(x_s, lev_s, lev_t, [lams[g]], preds[:1], kind)
      elif j == 2 and (solver == "midpoint" or solver == "lu" and k == 2):
        x = midpoint_step(x_s, lev_s, lev_t, preds[0], lams[g + 1], preds[1], kind)
      elif j == 3 and solver in ("midpoint", "lu"):
        x = exp_integrator_step(x_s, lev_s, lev_t, [lams[g], lams[g + 2]],
                                [preds[0], preds[2]], kind)
      else:
        x = exp_integrator_step(x_s, lev_s, lev_t, lams[g:g + j], preds[:j], kind)
      states.append(x)
      if j < k:
        preds.append(predict(x, g + j))
    g += k
  return states


def karras_sampler(y, karras_levels, times, denoise, heun, churn=None, noises=None):
  """Karras et al. (2022) Algorithm 1 (heun) / Euler, with Algorithm 2's churn.

  y: the variance-exploding sample x / alpha at karras_levels[0]; denoise(y, s, t) the
  x_0 prediction at Karras level s and timestep t; churn: (gammas, hat_times, s_noise)
  with noises[i] the N(0, I) draw of step i. Returns the VE states at every level.
  """
  states = [y]
  for i in range(len(times)):
    s, s_next = karras_levels[i], karras_levels[i + 1]
    t_hat = times[i]
    if churn is not None and churn[0][i] > 0:
      s_hat = s * (1 + churn[0][i])
      y = y + math.sqrt(s_hat**2 - s**2) * churn[2] * noises[i]
      t_hat = churn[1][i]
    else:
      s_hat = s
    d = (y - denoise(y, s_hat, t_hat)) / s_hat
    y_next = y + (s_next - s_hat) * d
    if heun and s_next != 0:
      t_next = times[i + 1] if i + 1 < len(times) else 0.0
      d2 = (y_next - denoise(y_next, s_next, t_next)) / s_next
      y_next = y + (s_next - s_hat) * (d + d2) / 2
    y = y_next
    states.append(y)
  return states
