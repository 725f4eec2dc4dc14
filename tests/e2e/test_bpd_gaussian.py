"""Bits/dim of a known model through the evaluation job vs a direct float64 computation.

The model is the Bayes-optimal eps-predictor for Gaussian data x_0 ~ N(m, s^2) per
dimension (the diffusion core's analytic case; its parameters are m and s). The job
(`bpd_job.evaluate_bpd`: chunked over a global batch sharded on 8 devices, resumable,
summarised) runs it on quantized Gaussian images of an .npz split with the paper's
T = 1000 linear schedule; the reference evaluates every term of the bound in float64
NumPy (`ddpm_reference`) with the job's documented noise: image i at timestep t uses
fold_in(fold_in(fold_in(key(seed), streams.BPD), i), t).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddpm_reference as ref
from diffusion_jax import config_base
from diffusion_jax.training import run_setup
from diffusion_jax import ops
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.evaluation import bpd_job
from diffusion_jax.evaluation import restore

T = 1000
M, S = 0.3, 0.5
NUM_IMAGES, BATCH, SIZE = 24, 16, 4  # two chunks, the second one padded


class GaussianOptimalEps:
  """E[eps | x_t] for x_0 ~ N(m, s^2): a 'network' whose parameters are m and s."""

  def __init__(self, alphas_cumprod):
    self._abar = jnp.asarray(alphas_cumprod, jnp.float32)

  def apply(self, variables, x, t, train=False):
    del train
    m, s = variables["params"]["m"], variables["params"]["s"]
    abar = self._abar[t].reshape(-1, 1, 1, 1)
    a, var = jnp.sqrt(abar), 1.0 - abar
    x0 = m + a * s**2 / (a**2 * s**2 + var) * (x - a * m)
    return (x - a * x0) / jnp.sqrt(var)


def np_optimal_eps(c, x, t):
  abar = c["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
  a, var = np.sqrt(abar), 1.0 - abar
  x0 = M + a * S**2 / (a**2 * S**2 + var) * (x - a * M)
  return (x - a * x0) / np.sqrt(var)


@pytest.fixture(scope="module")
def job_output(tmp_path_factory):
  root = tmp_path_factory.mktemp("bpd_gaussian")
  levels = np.round((M + S * np.random.default_rng(3).standard_normal(
      (NUM_IMAGES, SIZE, SIZE, 1)) + 1) * 127.5)
  images = np.clip(levels, 0, 255).astype(np.uint8)
  np.savez(root / "gauss.npz", x_train=images[:1], x_test=images)
  config = config_base.get_base_config()
  config.data.dataset, config.data.path = "npz", str(root / "gauss.npz")
  config.data.image_size, config.data.channels = SIZE, 1
  config.eval.bpd_batch_size = BATCH
  config.eval.bpd_clip_denoised = False
  config.eval.bpd_t_chunk = 50
  schedule = run_setup.build_schedule(config)
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  model = restore.EvalModel(
      params=jax.device_put({"m": jnp.float32(M), "s": jnp.float32(S)},
                            sharding.replicated(mesh)),
      step=1, params_kind="ema", model=GaussianOptimalEps(schedule.alphas_cumprod),
      schedule=schedule, mesh=mesh, ops=ops.XLA)
  workdir = root / "workdir"
  workdir.mkdir()
  patch = pytest.MonkeyPatch()
  patch.setattr(restore, "load_eval_model", lambda config, workdir, mesh=None: model)
  try:
    summary = bpd_job.evaluate_bpd(config, str(workdir))
  finally:
    patch.undo()
  return summary, images, config


def reference_bound(images, seed):
  """The bound of every image, term by term, in float64 NumPy."""
  c = ref.coefficients(ref.betas("linear", T))
  x0 = images.astype(np.float64) / 127.5 - 1.0
  base = jax.random.fold_in(jax.random.key(seed), streams.BPD)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(len(images)))
  draw = jax.jit(jax.vmap(lambda k, t: jax.random.normal(
      jax.random.fold_in(k, t), images.shape[1:], jnp.float32), in_axes=(0, None)))
  terms, mse = [], []
  for t in range(T):
    eps = np.asarray(draw(keys, t), np.float64)
    tb = np.full(len(images), t)
    xt = ref.q_sample(c, x0, tb, eps)
    term, px0 = ref.vb_term(c, np_optimal_eps(c, xt, tb), x0, xt, tb, "eps", "fixedlarge")
    terms.append(term)
    mse.append(ref.flat_mean((px0 - x0) ** 2))
  terms, mse = np.stack(terms, 1), np.stack(mse, 1)  # [N, T]
  prior = ref.prior_bits(c, x0)
  return {"total_bpd": terms.sum(1) + prior, "prior_bpd": prior,
          "decoder_bpd": terms[:, 0], "kl_bpd": terms[:, 1:].sum(1), "terms": terms,
          "mse": mse}


def test_job_bits_per_dim_of_the_gaussian_model_match_float64(job_output):
  summary, images, config = job_output
  want = reference_bound(images, int(config.seed))
  assert summary["num_images"] == NUM_IMAGES
  # Each part is a sum of up to 1000 float32 terms of O(1e-3..1) bits: a relative error
  # of 2e-5 is ~200 float32 ulps of the total, far below any formula error.
  for name in ("total_bpd", "prior_bpd", "decoder_bpd", "kl_bpd"):
    assert summary[name] == pytest.approx(float(want[name].mean()), rel=2e-5, abs=1e-7), name
  # Table 4: rate (prior + KL terms from the step on) and distortion every T/10 steps.
  terms, mse = want["terms"].mean(0), want["mse"].mean(0)
  for row in summary["table4"]:
    t = T - row["reverse_time"] + 1
    rate = float(want["prior_bpd"].mean()) + (terms[t:].sum() if t >= 1 else 0.0)
    # Late KL terms compare nearly equal Gaussians: float32 cancels O(1) quantities, a
    # few ulps of 1 (~3e-7 bits) of absolute error per term summed into the rate.
    assert row["rate_bpd"] == pytest.approx(rate, rel=1e-4, abs=3e-7 * (T - t + 1)), row
    assert row["distortion_rmse"] == pytest.approx(np.sqrt(mse[t - 1]) * 127.5, rel=1e-4), row


def test_the_optimal_model_is_near_the_data_entropy(job_output):
  """A bound on the NLL: about the entropy of the quantized Gaussian, never far below."""
  summary, _, _ = job_output
  from scipy import special  # pylint: disable=g-import-not-at-top
  edges = (np.arange(257) - 0.5) / 127.5 - 1
  edges[0], edges[-1] = -np.inf, np.inf
  p = np.diff(special.ndtr((edges - M) / S))
  entropy = -np.sum(p * np.log2(p))
  # 24 images x 16 dims: the Monte Carlo spread of the bound is ~0.1 bit.
  assert entropy - 0.3 <= summary["total_bpd"] <= entropy + 0.6, (summary, entropy)
