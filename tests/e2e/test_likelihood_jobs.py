"""The Analytic-DPM job and the bits/dim job's analytic, K-step chain and ODE parts, end
to end on 8 devices with a known model, against float64 NumPy computations.

The model is the Bayes-optimal predictor for Gaussian data x_0 ~ N(0, s^2) per dimension:
at an integer timestep t it uses the discrete alpha_bar_t, at a real-valued timestep label
the continuous-time view's alpha_bar (for the linear schedule score_sde's VP SDE,
log alpha_bar(t) = -(t^2 (20 - 0.1) / 2 + 0.1 t), t = label / (T - 1)), so its score is
exact for the ODE. The references use the documented per-image keys: Gamma's noise
fold_in(fold_in(fold_in(key(seed), ANALYTIC), i), t); the bound's fold_in(..BPD.., t); the
ODE's dequantization u = uniform(fold_in(fold_in(fold_in(key(seed), ODE), i), 0)).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax import config_base
from diffusion_jax import ops
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.diffusion import analytic_dpm
from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import bpd_job
from diffusion_jax.evaluation import restore
from diffusion_jax.training import run_setup

T, S = 1000, 0.5
NUM_TRAIN, NUM_TEST, BATCH, SIZE = 32, 24, 16, 4
CHAIN_K = 10


def log_abar_continuous(label):
  t = label / (T - 1)
  return -(0.5 * t**2 * (20.0 - 0.1) + 0.1 * t)


class GaussianOptimalEps:
  """E[eps | x_t] = sqrt(v) x / (a^2 s^2 + v) for x_0 ~ N(0, s^2); parameter s."""

  def __init__(self):
    abar = ref.coefficients(ref.betas("linear", T))["alphas_cumprod"]  # float64
    self._abar = jnp.asarray(abar, jnp.float32)
    self._v = jnp.asarray(1 - abar, jnp.float32)  # 1 - alpha_bar without cancellation

  def apply(self, variables, x, t, train=False):
    del train
    s = variables["params"]["s"]
    if jnp.issubdtype(t.dtype, jnp.integer):
      abar, v = self._abar[t], self._v[t]
    else:
      log_abar = log_abar_continuous(t.astype(jnp.float32))
      abar, v = jnp.exp(log_abar), -jnp.expm1(log_abar)
    abar, v = abar.reshape(-1, 1, 1, 1), v.reshape(-1, 1, 1, 1)
    return jnp.sqrt(v) * x / (abar * s**2 + v)


def np_eps(abar, x):
  return np.sqrt(1 - abar) * x / (abar * S**2 + 1 - abar)


def _quantized(n, seed):
  levels = np.round((S * np.random.default_rng(seed).standard_normal((n, SIZE, SIZE, 1))
                     + 1) * 127.5)
  return np.clip(levels, 0, 255).astype(np.uint8)


def _config(root):
  config = config_base.get_base_config()
  config.data.dataset, config.data.path = "npz", str(root / "gauss.npz")
  config.data.image_size, config.data.channels = SIZE, 1
  e = config.eval
  e.bpd_batch_size = e.analytic_batch_size = BATCH
  e.analytic_num_images = NUM_TRAIN
  e.bpd_clip_denoised = False
  e.bpd_t_chunk = e.analytic_t_chunk = 50
  e.bpd_analytic = True
  e.bpd_chain_steps = (CHAIN_K,)
  e.ode_trace = "exact"
  return config


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  root = tmp_path_factory.mktemp("likelihood")
  train, test = _quantized(NUM_TRAIN, 1), _quantized(NUM_TEST, 2)
  np.savez(root / "gauss.npz", x_train=train, x_test=test)
  config = _config(root)
  schedule = run_setup.build_schedule(config)
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  model = restore.EvalModel(
      params=jax.device_put({"s": jnp.float32(S)}, sharding.replicated(mesh)), step=1,
      params_kind="ema", model=GaussianOptimalEps(),
      schedule=schedule, mesh=mesh, ops=ops.XLA)
  workdir = str(root / "workdir")
  os.makedirs(workdir)
  patch = pytest.MonkeyPatch()
  patch.setattr(restore, "load_eval_model", lambda config, workdir, mesh=None: model)
  try:
    with pytest.raises(FileNotFoundError, match="--mode=eval_analytic"):
      bpd_job.evaluate_bpd(config, workdir)  # Gamma first; nothing computed
    assert not os.path.exists(os.path.join(workdir, "eval"))
    gamma_summary = analytic_job.estimate_gamma(config, workdir)
    config.eval.bpd_ode = False
    first = bpd_job.evaluate_bpd(config, workdir)
    vlb_chunk = os.path.join(bpd_job.chunk_dir(workdir, "test", 1), "batch_000000.npz")
    stamp = os.stat(vlb_chunk).st_mtime_ns
    config.eval.bpd_ode = True  # adds the ODE part; the other parts' chunks are kept
    summary = bpd_job.evaluate_bpd(config, workdir)
    assert os.stat(vlb_chunk).st_mtime_ns == stamp
    ode_chunk = bpd_job.chunk_dir(workdir, "test", 1) + "_ode/batch_000001.npz"
    os.remove(ode_chunk)
    resumed = bpd_job.evaluate_bpd(config, workdir)
  finally:
    patch.undo()
  return {"gamma": gamma_summary, "first": first, "summary": summary, "resumed": resumed,
          "train": train, "test": test, "config": config, "workdir": workdir}


def _keys(stream, n):
  base = jax.random.fold_in(jax.random.key(0), stream)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n))


@jax.jit
def _all_noise(keys):
  """[T, N, SIZE, SIZE, 1]: the noise of image n at timestep t, fold_in(keys[n], t)."""
  draw = lambda k, t: jax.random.normal(jax.random.fold_in(k, t), (SIZE * SIZE,))
  out = jax.vmap(lambda t: jax.vmap(lambda k: draw(k, t))(keys))(jnp.arange(T))
  return out.reshape((T, keys.shape[0], SIZE, SIZE, 1))


def test_gamma_job_matches_float64(jobs):
  with np.load(jobs["gamma"]["result_npz"]) as data:
    gamma, stderr = data["gamma"], data["gamma_stderr"]
    assert int(data["num_images"]) == NUM_TRAIN and str(data["params"]) == "ema"
  abar = ref.coefficients(ref.betas("linear", T))["alphas_cumprod"]
  x0 = jobs["train"].astype(np.float64) / 127.5 - 1.0
  eps = np.asarray(_all_noise(_keys(streams.ANALYTIC, NUM_TRAIN)), np.float64)
  a = abar.reshape(T, 1, 1, 1, 1)
  x_t = np.sqrt(a) * x0[None] + np.sqrt(1 - a) * eps
  terms = np.mean(np_eps(a, x_t) ** 2, axis=(2, 3, 4))  # [T, N]
  np.testing.assert_allclose(gamma, terms.mean(1), rtol=2e-5)
  np.testing.assert_allclose(stderr, terms.std(1, ddof=1) / math.sqrt(NUM_TRAIN),
                             rtol=1e-3)


def _reference_chain(abar, x0, eps, tau, variance):
  """Bound of the chain tau with variances [K] (float64; the paper's general form)."""
  steps = ref.analytic_chain(abar, tau)
  total = np.zeros(x0.shape[0])
  for k, (st, t) in enumerate(zip(steps, tau)):
    x_t = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps[t]
    x0_hat = (x_t - math.sqrt(1 - abar[t]) * np_eps(abar[t], x_t)) / math.sqrt(abar[t])
    mean = st["x0_coef"] * x0_hat + st["xt_coef"] * x_t
    if k == 0:
      total += -ref.flat_mean(ref.bin_log_prob(x0, mean, math.sqrt(variance[0])))
    else:
      true_mean = st["x0_coef"] * x0 + st["xt_coef"] * x_t
      total += ref.flat_mean(ref.kl_gauss(true_mean, st["lam2"], mean, variance[k]))
  a = abar[tau[-1]]
  total += ref.flat_mean(ref.kl_gauss(math.sqrt(a) * x0, 1 - a, 0.0, 1.0))
  return total / math.log(2)


def test_analytic_and_chain_bounds_match_float64(jobs):
  summary = jobs["summary"]
  with np.load(jobs["gamma"]["result_npz"]) as data:
    gamma = data["gamma"]
  abar = ref.coefficients(ref.betas("linear", T))["alphas_cumprod"]
  x0 = jobs["test"].astype(np.float64) / 127.5 - 1.0
  eps = np.asarray(_all_noise(_keys(streams.BPD, NUM_TEST)), np.float64)
  rows = {row["num_steps"]: row for row in summary["chains"]}
  assert sorted(rows) == [CHAIN_K, T] and summary["variances"][-1] == "analytic"
  for k in (CHAIN_K, T):
    tau = analytic_dpm.even_chain(T, k)
    unclipped, lower, upper = ref.analytic_variance(abar, tau, gamma)
    want = _reference_chain(abar, x0, eps, tau, np.clip(unclipped, lower, upper))
    assert rows[k]["analytic_bpd"] == pytest.approx(want.mean(), rel=3e-5), k
    steps = ref.analytic_chain(abar, tau)
    large = [1 - s["alpha"] for s in steps]
    large[0] = steps[1]["lam2"]
    want = _reference_chain(abar, x0, eps, tau, np.array(large))
    assert rows[k]["fixedlarge_bpd"] == pytest.approx(want.mean(), rel=3e-5), k
  # The full chain with fixedlarge is the main bound of the (fixedlarge) model: same noise.
  assert rows[T]["fixedlarge_bpd"] == pytest.approx(summary["total_bpd"], rel=1e-5)
  assert summary["analytic_total_bpd"] == rows[T]["analytic_bpd"]
  assert summary["analytic_total_bpd"] < summary["total_bpd"]
  assert rows[CHAIN_K]["analytic_bpd"] < rows[CHAIN_K]["fixedlarge_bpd"]


def test_ode_bits_per_dim_match_the_closed_form(jobs):
  summary = jobs["summary"]
  keys = _keys(streams.ODE, NUM_TEST)
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(
      jax.random.fold_in(k, 0), (SIZE, SIZE, 1)))(keys), np.float64)
  z = (jobs["test"].astype(np.float64) + u) / 128.0 - 1.0  # 2 (x + u) / 256 - 1
  var = math.exp(log_abar_continuous(1e-5 * (T - 1))) * (S**2 - 1) + 1
  logp = -0.5 * np.sum(z**2 / var + math.log(2 * math.pi * var), axis=(1, 2, 3))
  dim = SIZE * SIZE
  want = -logp / (dim * math.log(2)) + 7.0
  directory = bpd_job.chunk_dir(jobs["workdir"], "test", 1) + "_ode"
  got = []
  for k in range(2):
    with np.load(os.path.join(directory, f"batch_{k:06d}.npz")) as data:
      got.append(data["ode_bpd"])
  np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-4)
  assert summary["ode_bpd"] == pytest.approx(want.mean(), rel=1e-4)
  assert summary["ode_offset_bpd"] == 7.0
  assert summary["ode_density_bpd"] == pytest.approx(summary["ode_bpd"] - 7.0, rel=1e-6)
  assert "256" in summary["ode_dequantization"] and summary["ode_num_images"] == NUM_TEST


def test_parts_resume_and_summaries_agree(jobs, monkeypatch):
  first, summary, resumed = jobs["first"], jobs["summary"], jobs["resumed"]
  assert "ode_bpd" not in first and first["total_bpd"] == summary["total_bpd"]
  assert first["chains"] == summary["chains"]
  assert resumed["ode_bpd"] == pytest.approx(summary["ode_bpd"], rel=1e-6)
  # Other ODE settings: the existing ODE chunks are not mixed in.
  config = jobs["config"].copy_and_resolve_references()
  config.eval.ode_rtol = 1e-4
  schedule = run_setup.build_schedule(config)
  mesh = sharding.make_mesh()
  model = restore.EvalModel(
      params=jax.device_put({"s": jnp.float32(S)}, sharding.replicated(mesh)), step=1,
      params_kind="ema", model=GaussianOptimalEps(), schedule=schedule, mesh=mesh,
      ops=ops.XLA)
  monkeypatch.setattr(restore, "load_eval_model", lambda *a, **k: model)
  with pytest.raises(ValueError, match="ode_rtol"):
    bpd_job.evaluate_bpd(config, jobs["workdir"])


def test_gamma_file_serves_any_chain_and_refuses_other_parameters(jobs):
  """What the samplers' `variance=analytic` reads: the stored Gamma, for any chain."""
  config, workdir = jobs["config"], jobs["workdir"]
  data = analytic_job.load_gamma(config, workdir, 1, "ema")
  abar = ref.coefficients(ref.betas("linear", T))["alphas_cumprod"]
  tau = np.array([0, 7, 100, 420, 999])
  got = analytic_job.chain_variances(config, data["gamma"], tau)
  unclipped, lower, upper = ref.analytic_variance(abar, tau, data["gamma"])
  np.testing.assert_allclose(got["variance"], np.clip(unclipped, lower, upper), rtol=1e-9)
  full = ref.analytic_variance(abar, np.arange(T), data["gamma"])
  np.testing.assert_allclose(data["variance"], np.clip(*full), rtol=1e-9, atol=1e-30)
  with pytest.raises(ValueError, match="same eval.use_ema"):
    analytic_job.load_gamma(config, workdir, 1, "params")
  with pytest.raises(FileNotFoundError, match="eval_analytic"):
    analytic_job.load_gamma(config, workdir, 2, "ema")
