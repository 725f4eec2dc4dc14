"""Samplers vs float64 reference loops, DDIM(eta=1) == ancestral, jit/vmap/sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ddpm_reference as ref
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import inversion
from diffusion_jax.diffusion import karras
from diffusion_jax.diffusion import respacing
from diffusion_jax.diffusion import samplers
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import timesteps

T = 30
BETA = ("linear", T, 1e-3, 0.3)
SHAPE = (2, 2, 2)  # Per-sample (H, W, C).
B = 8


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def jnp_model(var_type):
  def model_fn(x, t):
    w = 0.5 + 0.4 * jnp.cos(t.astype(x.dtype)).reshape(-1, 1, 1, 1)
    mean = w * jnp.tanh(x) + 0.1 * x
    extra = {"learned": -4.0 + jnp.tanh(x), "learned_range": jnp.tanh(0.7 * x)}
    return jnp.concatenate([mean, extra[var_type]], -1) if var_type in extra else mean
  return model_fn


def np_model(var_type):
  def model(x, t):
    w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)
    mean = w * np.tanh(x) + 0.1 * x
    extra = {"learned": -4.0 + np.tanh(x), "learned_range": np.tanh(0.7 * x)}
    return np.concatenate([mean, extra[var_type]], -1) if var_type in extra else mean
  return model


@functools.partial(jax.jit, static_argnums=(2, 3))
def noise_at(keys, index, shape, dtype):
  """The documented convention: example b, index i -> normal(fold_in(keys[b], i))."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape, dtype))(
      keys)


def noises(keys, dtype=jnp.float64, shape=SHAPE, steps=T):
  """{t: [B, *shape]} for every step, and x_T (index T)."""
  return {t: np.asarray(noise_at(keys, t, shape, dtype), np.float64)
          for t in range(steps + 1)}


def fold(keys, index):
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, index)


@functools.lru_cache(maxsize=None)
def coefs():
  return ref.coefficients(ref.betas(*BETA))


def sched(dtype):
  return schedules.make_schedule(schedules.get_beta_schedule(*BETA), dtype)


KEYS = jax.random.split(jax.random.key(42), B)
ANCESTRAL = [("eps", "fixedlarge", True), ("x_start", "fixedsmall", False),
             ("v", "learned_range", True), ("mean", "learned", False)]
# (mean type, variance type, clip, eta, timesteps, eps from the clipped x0)
DDIM = [("eps", "fixedlarge", True, 0.0, [0, 4, 9, 17, 29], False),
        ("v", "learned_range", False, 0.5, [2, 3, 11, 20, 27], False),
        ("mean", "fixedsmall", True, 1.0, list(range(0, T, 3)), True),
        ("x_start", "fixedsmall", True, 0.3, [1, 8, 15, 22, 29], False)]
EVERY, T_SPLIT, NUM_COMPLETIONS, T_INTERP = 7, 12, 3, 17
LAMBDAS = np.array([0.0, 0.25, 1.0])
X_A, X_B = np.random.default_rng(0).uniform(-1, 1, (2, B) + SHAPE)


@functools.lru_cache(maxsize=None)
def float64_runs():
  """Every sampler configuration under test, in one compiled float64 program."""

  def run(keys, x_a, x_b):
    s = sched(jnp.float64)
    out = {}
    for i, (mean_type, var_type, clip) in enumerate(ANCESTRAL):
      out[f"ancestral{i}"] = samplers.ancestral_sample(
          jnp_model(var_type), s, keys, SHAPE, model_mean_type=mean_type,
          model_var_type=var_type, clip_denoised=clip)
    for i, (mean_type, var_type, clip, eta, seq, from_clipped) in enumerate(DDIM):
      out[f"ddim{i}"] = samplers.ddim_sample(
          jnp_model(var_type), s, keys, SHAPE, timesteps=seq, eta=eta,
          model_mean_type=mean_type, model_var_type=var_type, clip_denoised=clip,
          eps_from_clipped_x0=from_clipped)
    out["progressive"] = samplers.progressive_sample(jnp_model("fixedlarge"), s, keys, SHAPE,
                                                     every=EVERY)
    out["completions"] = samplers.sample_completions(
        jnp_model("fixedsmall"), s, keys, SHAPE, t_split=T_SPLIT,
        num_completions=NUM_COMPLETIONS, model_var_type="fixedsmall")
    out["interpolate"] = samplers.interpolate(jnp_model("fixedlarge"), s, x_a, x_b, keys,
                                              t=T_INTERP, lambdas=LAMBDAS)
    return out

  with jax.enable_x64(True):
    return jax.device_get(jax.jit(run)(KEYS, X_A, X_B)), noises(KEYS)


@pytest.mark.parametrize("i", range(len(ANCESTRAL)))
def test_ancestral_matches_reference_float64(i):
  mean_type, var_type, clip = ANCESTRAL[i]
  runs, z = float64_runs()
  out = runs[f"ancestral{i}"]
  assert out.dtype == np.float64 and out.shape == (B,) + SHAPE
  expected = ref.ancestral(coefs(), np_model(var_type), z[T], z, mean_type, var_type, clip)
  assert rel_err(out, expected) <= 1e-10


@pytest.mark.parametrize("i", range(len(DDIM)))
def test_ddim_matches_reference_float64(i):
  mean_type, var_type, clip, eta, seq, from_clipped = DDIM[i]
  runs, z = float64_runs()
  out = runs[f"ddim{i}"]
  assert out.dtype == np.float64
  expected = ref.ddim(coefs(), np_model(var_type), z[T], z, seq, eta, mean_type, var_type,
                      clip, from_clipped)
  assert rel_err(out, expected) <= 1e-10


def test_progressive_records_predictions():
  runs, z = float64_runs()
  out = runs["progressive"]
  final, records = ref.ancestral(coefs(), np_model("fixedlarge"), z[T], z, "eps",
                                 "fixedlarge", True, record_every=EVERY)
  assert list(out["timesteps"]) == [r[0] for r in records] == [28, 21, 14, 7, 0]
  assert out["pred_xstart"].shape == (B, 5) + SHAPE
  assert rel_err(out["sample"], final) <= 1e-10
  for i, (_, x0, xt) in enumerate(records):
    assert rel_err(out["pred_xstart"][:, i], x0) <= 1e-10
    assert rel_err(out["x_t"][:, i], xt) <= 1e-10
  # The last prediction of x0 is the sample itself (no noise at t = 0).
  assert rel_err(out["pred_xstart"][:, -1], out["sample"]) <= 1e-10


def test_completions_share_the_latent():
  runs, z = float64_runs()
  out = runs["completions"]
  assert out["samples"].shape == (B, NUM_COMPLETIONS) + SHAPE
  c, model = coefs(), np_model("fixedsmall")
  shared = ref.ancestral(c, model, z[T], z, "eps", "fixedsmall", True, t_start=T - 1,
                         t_end=T_SPLIT + 1)
  assert rel_err(out["x_t"], shared) <= 1e-10
  base = fold(KEYS, T + 1)
  with jax.enable_x64(True):
    for j in range(NUM_COMPLETIONS):
      zj = noises(fold(base, j))
      expected = ref.ancestral(c, model, shared, zj, "eps", "fixedsmall", True,
                               t_start=T_SPLIT)
      assert rel_err(out["samples"][:, j], expected) <= 1e-10
  spread = np.std(out["samples"], axis=1).mean()
  assert spread > 1e-3  # The completions differ from each other.


def test_interpolation_through_shared_noise():
  runs, z = float64_runs()
  out = runs["interpolate"]
  assert out["samples"].shape == (B, 3) + SHAPE
  c = coefs()
  tb = np.full(B, T_INTERP)
  with jax.enable_x64(True):
    enc = fold(KEYS, T + 2)
    noise_a, noise_b = (np.asarray(noise_at(enc, i, SHAPE, jnp.float64)) for i in (0, 1))
  xt_a, xt_b = ref.q_sample(c, X_A, tb, noise_a), ref.q_sample(c, X_B, tb, noise_b)
  assert rel_err(out["x_t_a"], xt_a) <= 1e-10 and rel_err(out["x_t_b"], xt_b) <= 1e-10
  for i, lam in enumerate(LAMBDAS):
    expected = ref.ancestral(c, np_model("fixedlarge"), (1 - lam) * xt_a + lam * xt_b, z,
                             "eps", "fixedlarge", True, t_start=T_INTERP)
    assert rel_err(out["samples"][:, i], expected) <= 1e-10


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
def test_ddim_eta1_all_steps_equals_ancestral_fixedsmall(dtype, tol):
  """The same noise (fold_in(keys[b], t)) makes the two samplers agree up to rounding
  (in float32: 1000 steps of rounding, a few u each). With clipping, eps must come from
  the clipped x_0, as in the posterior mean of ancestral sampling."""
  keys = KEYS[:4]
  kw = dict(model_mean_type="eps", model_var_type="fixedsmall", clip_denoised=True)
  with jax.enable_x64(dtype == jnp.float64):
    s1000 = schedules.make_schedule(schedules.get_beta_schedule("linear", 1000), dtype)

    def run(k):
      model = jnp_model("fixedsmall")
      return (samplers.ddim_sample(model, s1000, k, SHAPE, eta=1.0, eps_from_clipped_x0=True,
                                   **kw),
              samplers.ancestral_sample(model, s1000, k, SHAPE, **kw),
              samplers.ddim_sample(model, s1000, k, SHAPE, eta=0.0, eps_from_clipped_x0=True,
                                   **kw))

    ddim, ancestral, ddim0 = jax.jit(run)(keys)
    assert ddim.dtype == dtype
    assert rel_err(ddim, ancestral) <= tol
    assert rel_err(ddim0, ancestral) > 1e-2  # eta = 0 is another sampler.


SHARD_KEYS = jax.random.split(jax.random.key(7), 16)
LOGSNR_GRID = timesteps.make_grid(ref.betas(*BETA), 6, "logsnr")
SHARD_XA, SHARD_XB = np.random.default_rng(1).uniform(-1, 1, (2, 16) + SHAPE).astype(
    np.float32)


def _all_samplers(keys, x_a, x_b):
  s = sched(jnp.float32)
  model = jnp_model("learned_range")
  kw = dict(model_mean_type="v", model_var_type="learned_range")
  return {
      "ancestral": samplers.ancestral_sample(model, s, keys, SHAPE, **kw),
      "ddim": samplers.ddim_sample(model, s, keys, SHAPE, timesteps=[0, 5, 10, 20],
                                   eta=0.7, **kw),
      "progressive": samplers.progressive_sample(model, s, keys, SHAPE, every=10,
                                                 **kw)["pred_xstart"],
      "completions": samplers.sample_completions(model, s, keys, SHAPE, t_split=15,
                                                 num_completions=2, **kw)["samples"],
      "interpolate": samplers.interpolate(model, s, x_a, x_b, keys, t=20,
                                          lambdas=jnp.array([0.0, 0.5]), **kw)["samples"],
      "respaced": respacing.sample(model, s, respacing.respace(BETAS30, [0, 9, 20, 29]),
                                   keys, SHAPE, **kw),
      "dpmpp_2m": dpm_solver.sample(model, s, keys, SHAPE, LOGSNR_GRID, **kw),
      "dpm_3s": dpm_solver.sample(model, s, keys, SHAPE, LOGSNR_GRID, order=3,
                                  algorithm="dpmsolver", method="singlestep", **kw),
      "heun_churn": karras.sample(model, s, keys, SHAPE, LOGSNR_GRID,
                                  churn=karras.make_churn(BETAS30, LOGSNR_GRID, 3.0), **kw),
  }


@functools.lru_cache(maxsize=None)
def float32_runs():
  return jax.device_get(jax.jit(_all_samplers)(SHARD_KEYS, SHARD_XA, SHARD_XB))


def test_float32_path():
  out = float32_runs()
  assert all(value.dtype == np.float32 for value in out.values())
  with jax.enable_x64(True):
    z = noises(SHARD_KEYS, jnp.float32)
  expected = ref.ancestral(coefs(), np_model("learned_range"), z[T], z, "v", "learned_range",
                           True)
  # Each step rounds at a few u of the O(1) state; the chain does not amplify it.
  np.testing.assert_allclose(out["ancestral"], expected, rtol=0, atol=T * 16 * ref.U32)
  expected = ref.ddim(coefs(), np_model("learned_range"), z[T], z, [0, 5, 10, 20], 0.7, "v",
                      "learned_range", True)
  np.testing.assert_allclose(out["ddim"], expected, rtol=0, atol=4 * 16 * ref.U32)


def test_samplers_under_jit_vmap_and_8_device_sharding():
  """Per-example keys: a sample does not depend on its batch or on the sharding."""
  plain = float32_runs()
  # vmap over 2 groups of 8, with the 8 examples of each group spread over 8 devices.
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8
  sharding = NamedSharding(mesh, P(None, "batch"))
  put = lambda a: jax.device_put(a.reshape((2, 8) + a.shape[1:]), sharding)
  vmapped = jax.jit(jax.vmap(_all_samplers))(put(SHARD_KEYS), put(SHARD_XA), put(SHARD_XB))
  for name, value in plain.items():
    assert vmapped[name].sharding.is_equivalent_to(sharding, vmapped[name].ndim), name
    np.testing.assert_allclose(np.asarray(vmapped[name]).reshape(value.shape), value,
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_sampler_errors():
  s = sched(jnp.float32)
  model = jnp_model("fixedlarge")
  with pytest.raises(ValueError, match="strictly increasing"):
    samplers.ddim_sample(model, s, KEYS, SHAPE, timesteps=[0, 5, 5])
  with pytest.raises(ValueError, match=r"in \[0, 30\)"):
    samplers.ddim_sample(model, s, KEYS, SHAPE, timesteps=[0, 30])
  with pytest.raises(ValueError, match="t_split must be a Python int in"):
    samplers.sample_completions(model, s, KEYS, SHAPE, t_split=30, num_completions=2)
  with pytest.raises(ValueError, match="one PRNG key per example"):
    samplers.ancestral_sample(model, s, jnp.zeros((8,)), SHAPE)
  with pytest.raises(ValueError, match="Got 4 keys for a batch of 8"):
    samplers.interpolate(model, s, jnp.zeros((8,) + SHAPE), jnp.zeros((8,) + SHAPE),
                         KEYS[:4], t=3, lambdas=[0.5])
  with pytest.raises(ValueError, match="Unknown model_var_type"):
    samplers.ancestral_sample(model, s, KEYS, SHAPE, model_var_type="large")
  with pytest.raises(ValueError, match=r"per-sample shape, e.g. \(H, W, C\), got 8"):
    samplers.progressive_sample(model, s, KEYS, 8)
  with pytest.raises(ValueError, match="every must be a positive integer"):
    samplers.progressive_sample(model, s, KEYS, SHAPE, every=0)


def test_ddim_timesteps():
  np.testing.assert_array_equal(samplers.ddim_timesteps(1000, 50)[:3], [0, 20, 40])
  assert samplers.ddim_timesteps(1000, 50)[-1] == 980
  lin = samplers.ddim_timesteps(1000, 10, "linspace")
  assert lin[0] == 0 and lin[-1] == 999 and len(lin) == 10
  quad = samplers.ddim_timesteps(1000, 20, "quad")
  np.testing.assert_array_equal(
      quad, [int((np.sqrt(800) * i / 19)**2) for i in range(20)])
  assert np.all(np.diff(quad) > 0) and quad[-1] == 800
  # DDIM's quadratic recipe repeats early timesteps for large S: they are dropped.
  quad50 = samplers.ddim_timesteps(1000, 50, "quad")
  assert len(quad50) == 49 and np.all(np.diff(quad50) > 0)
  with pytest.raises(ValueError, match="num_steps=0"):
    samplers.ddim_timesteps(1000, 0)
  with pytest.raises(ValueError, match="Unknown spacing"):
    samplers.ddim_timesteps(1000, 10, "cosine")


# --- Respaced ancestral, DPM-Solver and Karras samplers (see also test_solver_parity) ---

BETAS30 = ref.betas(*BETA)
RESPACED = [("eps", "fixedlarge", True), ("mean", "fixedsmall", False),
            ("v", "learned_range", True), ("x_start", "learned", False)]
SUBSEQ = np.array([0, 3, 4, 11, 19, 29])


def _respaced_reference(seq, z, mean_type, var_type, clip, variances=None):
  """ref.ancestral on the K-step diffusion: betas 1 - abar[s_k] / abar[s_{k-1}], the model
  at the original timesteps, noise z[s_k]; a "mean" output converted with the original
  step's posterior."""
  abar = np.cumprod(1 - BETAS30)[seq]
  c = ref.coefficients(1 - abar / np.append(1.0, abar[:-1]))
  full, model = coefs(), np_model(var_type)

  def spaced_model(x, k):
    out = model(x, seq[k])
    C = x.shape[-1]
    if mean_type == "mean":
      x0 = ref.x0_from_mean(full, x, seq[k], out[..., :C])  # the original step's posterior
      out = np.concatenate([ref.posterior_mean(c, x0, x, k), out[..., C:]], -1)
    if variances is not None:  # as a "learned" log-variance output
      log_var = np.log(variances)[np.asarray(k)].reshape(-1, 1, 1, 1)
      out = np.concatenate([out[..., :C], np.broadcast_to(log_var, x.shape)], -1)
    return out

  if variances is not None:
    var_type = "learned"

  return ref.ancestral(c, spaced_model, z[T], {k: z[t] for k, t in enumerate(seq)},
                       mean_type, var_type, clip)


@functools.lru_cache(maxsize=None)
def respaced_runs():
  def run(keys):
    s = sched(jnp.float64)
    out = {}
    for i, (mean_type, var_type, clip) in enumerate(RESPACED):
      kw = dict(model_mean_type=mean_type, model_var_type=var_type,
                transform=denoiser.X0Transform(clip=clip))
      for name, seq in (("all", np.arange(T)), ("sub", SUBSEQ)):
        out[f"{name}{i}"] = respacing.sample(jnp_model(var_type), s,
                                             respacing.respace(BETAS30, seq, jnp.float64),
                                             keys, SHAPE, **kw)
      out[f"ancestral{i}"] = samplers.ancestral_sample(
          jnp_model(var_type), s, keys, SHAPE, model_mean_type=mean_type,
          model_var_type=var_type, clip_denoised=clip)
    out["hook"] = respacing.sample(jnp_model("fixedlarge"), s,
                                   respacing.respace(BETAS30, SUBSEQ, jnp.float64), keys,
                                   SHAPE, variances=VARIANCES)
    return out

  with jax.enable_x64(True):
    return jax.device_get(jax.jit(run)(KEYS))


VARIANCES = np.linspace(0.3, 0.01, len(SUBSEQ))


@pytest.mark.parametrize("i", range(len(RESPACED)))
def test_respaced_sampler(i):
  """All T steps: exactly ancestral sampling (same keys); a subsequence: the float64
  reference with recomputed betas."""
  mean_type, var_type, clip = RESPACED[i]
  runs, (_, z) = respaced_runs(), float64_runs()
  assert rel_err(runs[f"all{i}"], runs[f"ancestral{i}"]) <= 1e-12
  expected = _respaced_reference(SUBSEQ, z, mean_type, var_type, clip)
  assert rel_err(runs[f"sub{i}"], expected) <= 1e-10


def test_respaced_variance_hook():
  expected = _respaced_reference(SUBSEQ, float64_runs()[1], "eps", "fixedlarge", True,
                                 variances=VARIANCES)
  assert rel_err(respaced_runs()["hook"], expected) <= 1e-10


def test_ddim_eta0_is_dpm_solver_order1():
  """DDIM (eta = 0, no clipping) is DPM-Solver-1 in both forms on the same grid."""
  seq = [0, 4, 9, 17, 29]
  grid = timesteps.grid_from_timesteps(BETAS30, seq[::-1])
  with jax.enable_x64(True):
    s = sched(jnp.float64)
    model = jnp_model("fixedlarge")
    ddim = samplers.ddim_sample(model, s, KEYS, SHAPE, timesteps=seq, clip_denoised=False)
    for algorithm in ("dpmsolver++", "dpmsolver"):  # the ODE solvers
      dpm = dpm_solver.sample(model, s, KEYS, SHAPE, grid, order=1, algorithm=algorithm)
      assert rel_err(dpm, ddim) <= 1e-12, algorithm


def test_new_sampler_errors():
  s = sched(jnp.float32)
  model = jnp_model("fixedlarge")
  logsnr = timesteps.make_grid(BETAS30, 5, "logsnr")
  with pytest.raises(ValueError, match="'mean' .* works only on integer timesteps"):
    dpm_solver.sample(model, s, KEYS, SHAPE, logsnr, model_mean_type="mean")
  with pytest.raises(ValueError, match="needs lower_order_final=True"):
    dpm_solver.sample(model, s, KEYS, SHAPE, logsnr, order=3, method="singlestep",
                      lower_order_final=False)
  with pytest.raises(ValueError, match="Unknown DPM-Solver algorithm"):
    dpm_solver.sample(model, s, KEYS, SHAPE, logsnr, algorithm="unipc")
  no_end = timesteps.grid_from_karras_sigmas([20.0, 10.0], [9.0, 3.0, 1.0])
  with pytest.raises(ValueError, match="Heun's last corrector"):
    karras.sample(model, s, KEYS, SHAPE, no_end, method="heun")
  with pytest.raises(ValueError, match="Churn needs s_churn >= 0"):
    karras.make_churn(BETAS30, logsnr, -1.0)
  with pytest.raises(ValueError, match="strictly increasing sequence of ints"):
    respacing.respace(BETAS30, [0, 5, 5])
  spaced = respacing.respace(BETAS30, SUBSEQ)
  with pytest.raises(ValueError, match=r"variances must have shape \[6\]"):
    respacing.sample(model, s, spaced, KEYS, SHAPE, variances=jnp.ones(5))
  with pytest.raises(ValueError, match="build it with respace"):
    respacing.sample(model, s, respacing.respace(BETAS30, SUBSEQ, jnp.float16), KEYS,
                     SHAPE)
  with pytest.raises(ValueError, match="the grid must end noise-free"):
    inversion.encode(model, s, jnp.zeros((8,) + SHAPE),
                     timesteps.make_grid(BETAS30, 5, "linspace", final_step="t0"))
  with pytest.raises(ValueError, match="threshold_ratio must be in"):
    dpm_solver.sample(model, s, KEYS, SHAPE, logsnr,
                      transform=denoiser.X0Transform(threshold_ratio=1.5))
