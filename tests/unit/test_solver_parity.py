"""Few-step samplers step by step against diffusers' schedulers and float64 references.

One deterministic model function, written twice (NumPy for diffusers and the reference,
JAX for ours), and the same grid must give the same trajectory: every state within
1e-5 (relative to the state's largest entry) in float32, and within 1e-10 under x64
where diffusers has no float32-only step (DPMSolverSinglestep, Heun, DDPM with their
coefficient tables given in float64). DPMSolverMultistep and EulerDiscrete round the
sample to float32 inside `step`; under x64 those samplers are compared with the float64
NumPy reference (`ddpm_reference`: exact integrals of the interpolating polynomials).

diffusers computes alpha_bar in float32 (off by up to 1e-4 at T = 1000); the tests hand
it the float64 alpha_bar so that both sides use the same noise levels.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import diffusers
from diffusers.schedulers import scheduling_ddpm
from diffusers.schedulers import scheduling_dpmsolver_multistep

import ddpm_reference as ref
from diffusion_jax.diffusion import denoiser
from diffusion_jax.diffusion import dpm_solver
from diffusion_jax.diffusion import karras
from diffusion_jax.diffusion import respacing
from diffusion_jax.diffusion import schedules
from diffusion_jax.diffusion import timesteps as ts

T = 1000
BETAS = ref.betas("linear", T)
ABAR = np.cumprod(1.0 - BETAS)
B, SHAPE = 2, (2, 2, 3)  # 3 channels: diffusers' learned variances slice [:, :3]
X = np.random.default_rng(0).standard_normal((B,) + SHAPE)
KEYS = jax.random.split(jax.random.key(5), B)
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*algorithm_type.*dpmsolver.*:FutureWarning")
PRED = {"eps": "epsilon", "x_start": "sample", "v": "v_prediction"}


def np_model(x, t, learned=False):
  """x [B, H, W, C] float64, t [B] -> [B, H, W, C] (2C with a variance half)."""
  w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64) / 150).reshape(-1, 1, 1, 1)
  out = w * np.tanh(1.3 * x) + 0.1 * x
  return np.concatenate([out, np.tanh(0.7 * x)], -1) if learned else out


def jax_model(learned=False):
  def model_fn(x, t):
    w = 0.5 + 0.4 * jnp.cos(t.astype(x.dtype) / 150).reshape(-1, 1, 1, 1)
    out = w * jnp.tanh(1.3 * x) + 0.1 * x
    return jnp.concatenate([out, jnp.tanh(0.7 * x)], -1) if learned else out
  return model_fn


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def nhwc(tensor):
  return tensor.detach().numpy().transpose(0, 2, 3, 1).astype(np.float64)


def scheduler(cls, **kwargs):
  sched = cls(num_train_timesteps=T, trained_betas=BETAS, **kwargs)
  sched.alphas_cumprod = torch.from_numpy(ABAR)
  return sched


def max_step_error(ours, theirs):
  """max over states of max |ours - theirs| / max |theirs|."""
  return max(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))
             for a, b in zip(ours, theirs))


def run_diffusers(sched, x0, dtype, learned=False, heun=False):
  """States after every (full) step of a diffusers scheduler from x0 [B, H, W, C]."""
  sample = nchw(x0).to(dtype)
  states = [x0]
  for k, t in enumerate(sched.timesteps):
    inp = nhwc(sched.scale_model_input(sample, t))
    out = nchw(np_model(inp, np.full(B, float(t)), learned)).to(dtype)
    sample = sched.step(out, t, sample).prev_sample
    if not heun or sched.state_in_first_order or k == len(sched.timesteps) - 1:
      states.append(nhwc(sample))
  return states


def schedule(dtype):
  return schedules.make_schedule(BETAS, dtype)


# --- DPM-Solver(++) multistep: DPMSolverMultistepScheduler -----------------------------
# (order, algorithm, spacing, final, mean type, steps, solver type, learned, threshold)
MULTISTEP = [
    (2, "dpmsolver++", "linspace", "zero", "eps", 10, "midpoint", False, None),
    (2, "dpmsolver++", "leading", "t0", "v", 20, "heun", False, None),
    (3, "dpmsolver++", "trailing", "zero", "x_start", 20, "midpoint", False, None),
    (3, "dpmsolver", "linspace", "t0", "eps", 12, "midpoint", True, None),
    (2, "dpmsolver", "trailing", "t0", "v", 16, "heun", False, None),
    (2, "dpmsolver++", "linspace", "zero", "eps", 10, "midpoint", False, (0.9, 1.5)),
    (3, "dpmsolver", "leading", "t0", "x_start", 10, "midpoint", False, (0.8, 2.0)),
]


def _multistep_scheduler(order, algorithm, spacing, final, mean_type, steps, solver,
                         learned, threshold):
  kw = dict(thresholding=True, dynamic_thresholding_ratio=threshold[0],
            sample_max_value=threshold[1]) if threshold else {}
  sched = scheduler(diffusers.DPMSolverMultistepScheduler, solver_order=order,
                    algorithm_type=algorithm, timestep_spacing=spacing,
                    final_sigmas_type="zero" if final == "zero" else "sigma_min",
                    prediction_type=PRED[mean_type], solver_type=solver,
                    variance_type="learned_range" if learned else None, **kw)
  sched.set_timesteps(steps)
  return sched


def _ours(case, dtype, method):
  order, algorithm, spacing, final, mean_type, steps, solver, learned, threshold = case
  grid = ts.make_grid(BETAS, steps, spacing, final_step=final)
  transform = denoiser.X0Transform(threshold_ratio=threshold[0], threshold_max=threshold[1]
                                   ) if threshold else denoiser.X0Transform()
  return grid, functools.partial(
      dpm_solver.solve, jax_model(learned), schedule(dtype), jnp.asarray(X, dtype), grid,
      order=order, algorithm=algorithm, method=method, solver_type=solver,
      model_mean_type=mean_type,
      model_var_type="learned_range" if learned else "fixedlarge",
      transform=transform, diffusers_multistep3=True, trajectory=True)


@pytest.mark.parametrize("case", MULTISTEP, ids=str)
def test_multistep_matches_diffusers_float32(case):
  sched = _multistep_scheduler(*case)
  grid, ours = _ours(case, jnp.float32, "multistep")
  np.testing.assert_array_equal(grid.timesteps, sched.timesteps.numpy())
  theirs = run_diffusers(sched, X.astype(np.float32), torch.float32, learned=case[7])
  assert len(theirs) == grid.num_steps + 1
  assert max_step_error(ours(), theirs) <= 1e-5


def _groups(orders):
  groups = []
  for o in orders:
    groups.append(1) if o == 1 else groups.__setitem__(-1, groups[-1] + 1)
  return groups


def _reference(case, grid, method, orders):
  order, algorithm, _, _, mean_type, _, solver, _, threshold = case
  levels = list(zip(grid.alphas, grid.sigmas))
  kind = "data" if algorithm == "dpmsolver++" else "noise"

  def predict(x, i):
    out = np_model(x, np.full(B, grid.timesteps[i]))
    x0, eps = ref.predict_x0_eps(out, x, *levels[i], mean_type, threshold=threshold)
    return x0 if kind == "data" else eps

  if method == "multistep":
    return ref.dpm_multistep(X, levels, predict, order, kind, solver)
  return ref.dpm_singlestep(X, levels, predict, _groups(orders), kind, solver)


@pytest.mark.parametrize("case", MULTISTEP, ids=str)
def test_multistep_matches_reference_float64(case):
  """Our 3M against the exact integral of the quadratic (the Taylor weight of D2)."""
  with jax.enable_x64(True):
    grid, ours = _ours(case, jnp.float64, "multistep")
    out = ours(diffusers_multistep3=False)
  assert out.dtype == jnp.float64
  expected = _reference(case, grid, "multistep", None)
  assert max_step_error(out, expected) <= 1e-10


# --- SDE-DPM-Solver++: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++") --
# (order, spacing, final, mean type, steps, solver type)
SDE_MULTISTEP = [
    (2, "linspace", "zero", "eps", 10, "midpoint"),
    (2, "trailing", "t0", "v", 16, "heun"),
    (1, "leading", "zero", "x_start", 12, "midpoint"),
    (2, "linspace", "t0", "eps", 20, "heun"),
]


@pytest.mark.parametrize("case", SDE_MULTISTEP, ids=str)
def test_sde_multistep_matches_diffusers_float32(case, monkeypatch):
  """The same noise (ours: step i of example b from fold_in(KEYS[b], i)) handed to
  diffusers' sampler gives the same trajectory."""
  order, spacing, final, mean_type, steps, solver = case
  sched = scheduler(diffusers.DPMSolverMultistepScheduler, solver_order=order,
                    algorithm_type="sde-dpmsolver++", timestep_spacing=spacing,
                    final_sigmas_type="zero" if final == "zero" else "sigma_min",
                    prediction_type=PRED[mean_type], solver_type=solver)
  sched.set_timesteps(steps)
  grid = ts.make_grid(BETAS, steps, spacing, final_step=final)
  np.testing.assert_array_equal(grid.timesteps, sched.timesteps.numpy())
  ours = dpm_solver.solve(jax_model(), schedule(jnp.float32), jnp.asarray(X, jnp.float32),
                          grid, order=order, algorithm="sde-dpmsolver++", solver_type=solver,
                          model_mean_type=mean_type, trajectory=True, noise_keys=KEYS)
  step_noise = iter([_noise(i, jnp.float32) for i in range(steps)])
  monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor",
                      lambda *a, **k: nchw(next(step_noise)).to(torch.float32))
  theirs = run_diffusers(sched, X.astype(np.float32), torch.float32)
  assert len(theirs) == grid.num_steps + 1
  assert max_step_error(ours, theirs) <= 1e-5
  monkeypatch.undo()  # The draws matter: diffusers' own noise gives another sample.
  sched.set_timesteps(steps)
  other = run_diffusers(sched, X.astype(np.float32), torch.float32)[-1]
  assert np.max(np.abs(np.asarray(ours[-1]) - other)) > 1e-3


def test_sde_first_order_is_the_ddpm_posterior_step_float64():
  """SDE-DPM-Solver++(1) over consecutive timesteps 9..0 is DDPM's ancestral step with the
  posterior variance (Eq. 7, beta-tilde), float64 reference from the betas."""
  c = ref.coefficients(BETAS)
  seq = np.arange(9, -1, -1)
  grid = ts.grid_from_timesteps(BETAS, seq, final_step="zero")
  with jax.enable_x64(True):
    x_start = ref.q_sample(c, np.tanh(X), np.full(B, 9), X[::-1])
    out = dpm_solver.solve(jax_model(), schedule(jnp.float64), jnp.asarray(x_start), grid,
                           order=1, algorithm="sde-dpmsolver++", model_mean_type="eps",
                           trajectory=True, noise_keys=KEYS)
    noises = [_noise(i, jnp.float64) for i in range(len(seq))]
  x, expected = x_start, [x_start]
  for i, t in enumerate(seq):
    t_b = np.full(B, t)
    x0 = ref.x0_from_eps(c, x, t_b, np_model(x, t_b))
    var = c["posterior_variance"][t]
    x = ref.posterior_mean(c, x0, x, t_b) + np.sqrt(var) * noises[i]
    expected.append(x)
  assert c["posterior_variance"][0] == 0.0  # the last step returns the mean, x_0-hat
  assert max_step_error(out, expected) <= 1e-10


def test_sde_options_are_checked():
  grid = ts.make_grid(BETAS, 10, "logsnr")
  for kw in (dict(order=3), dict(method="singlestep"), dict(solver_type="lu")):
    options = {**dict(order=2, method="multistep", solver_type="midpoint"), **kw}
    with pytest.raises(ValueError, match="sde-dpmsolver.. is multistep of order 1 or 2"):
      dpm_solver.update_coefficients(grid, algorithm="sde-dpmsolver++", **options)
  with pytest.raises(ValueError, match="pass noise_keys"):
    dpm_solver.solve(jax_model(), schedule(jnp.float32), jnp.asarray(X, jnp.float32), grid,
                     algorithm="sde-dpmsolver++")


# --- Singlestep: DPMSolverSinglestepScheduler (linspace grids only) --------------------
SINGLESTEP = [
    (2, "dpmsolver++", "linspace", "zero", "eps", 10, "midpoint", False, None),
    (3, "dpmsolver", "linspace", "t0", "eps", 12, "midpoint", False, None),
    (3, "dpmsolver", "linspace", "t0", "v", 13, "heun", False, None),
    (2, "dpmsolver", "linspace", "t0", "eps", 11, "heun", True, None),
    (2, "dpmsolver++", "linspace", "t0", "x_start", 9, "midpoint", False, None),
    (3, "dpmsolver++", "linspace", "zero", "v", 14, "heun", False, (0.9, 1.2)),
]


def _singlestep_scheduler(case, float64):
  order, algorithm, _, final, mean_type, steps, solver, learned, threshold = case
  kw = dict(thresholding=True, dynamic_thresholding_ratio=threshold[0],
            sample_max_value=threshold[1]) if threshold else {}
  sched = scheduler(diffusers.DPMSolverSinglestepScheduler, solver_order=order,
                    algorithm_type=algorithm,
                    final_sigmas_type="zero" if final == "zero" else "sigma_min",
                    prediction_type=PRED[mean_type], solver_type=solver,
                    lower_order_final=steps % order != 0 or final == "zero",
                    variance_type="learned_range" if learned else None, **kw)
  sched.set_timesteps(steps)
  if float64:  # the same levels, in float64 (set_timesteps casts them to float32)
    levels = np.sqrt((1 - ABAR) / ABAR)[sched.timesteps.numpy()]
    last = 0.0 if final == "zero" else np.sqrt((1 - ABAR[0]) / ABAR[0])
    sched.sigmas = torch.from_numpy(np.append(levels, last))
  return sched


@pytest.mark.parametrize("steps", [12, 13])
def test_lu_dpm_solver_3_matches_reference_float64(steps):
  """Lu et al.'s DPM-Solver-3 (their code's 'dpmsolver' type) on the DPM-Solver-fast grid
  (no diffusers counterpart): outer steps uniform in log-SNR, orders 3, ..., 2, 1."""
  case = (3, "dpmsolver", "dpm_fast", "t0", "eps", steps, "lu", False, None)
  with jax.enable_x64(True):
    grid, ours = _ours(case, jnp.float64, "singlestep")
    out = ours()
  lam = grid.lambdas
  outer = np.cumsum([0] + ts.dpm_fast_orders(steps))  # the outer steps' first levels
  np.testing.assert_allclose(np.diff(lam[outer]), (lam[-1] - lam[0]) / (len(outer) - 1),
                             rtol=1e-9)
  orders = dpm_solver.singlestep_orders(steps, 3, True, False)
  assert max_step_error(out, _reference(case, grid, "singlestep", orders)) <= 1e-10


@pytest.mark.parametrize("case", SINGLESTEP, ids=str)
@pytest.mark.parametrize("float64", [False, True])
def test_singlestep_matches_diffusers(case, float64):
  sched = _singlestep_scheduler(case, float64)
  dtype = jnp.float64 if float64 else jnp.float32
  with jax.enable_x64(float64):
    grid, ours = _ours(case, dtype, "singlestep")
    out = ours(lower_order_final=sched.config.lower_order_final)
  np.testing.assert_array_equal(grid.timesteps, sched.timesteps.numpy())
  np.testing.assert_array_equal(
      dpm_solver.singlestep_orders(grid.num_steps, case[0], sched.config.lower_order_final,
                                   grid.noise_free_end), sched.order_list)
  theirs = run_diffusers(sched, X if float64 else X.astype(np.float32),
                         torch.float64 if float64 else torch.float32, learned=case[7])
  assert max_step_error(out, theirs) <= (1e-10 if float64 else 1e-5)
  if float64:  # and the independent reference, with diffusers' group layout
    expected = _reference(case, grid, "singlestep", sched.order_list)
    assert max_step_error(out, expected) <= 1e-10


# --- Karras: HeunDiscreteScheduler and EulerDiscreteScheduler -------------------------
# (scheduler, spacing, karras levels, mean type, steps, clip, final)
KARRAS = [
    ("heun", "linspace", False, "eps", 10, True, "zero"),
    ("heun", "linspace", True, "v", 8, False, "zero"),
    ("heun", "leading", False, "x_start", 10, False, "zero"),
    ("euler", "linspace", True, "eps", 12, False, "zero"),
    ("euler", "trailing", False, "v", 10, False, "sigma_min"),
]


def _karras_scheduler(method, spacing, use_karras, mean_type, steps, clip, final, float64):
  if method == "heun":
    sched = scheduler(diffusers.HeunDiscreteScheduler, timestep_spacing=spacing,
                      use_karras_sigmas=use_karras, prediction_type=PRED[mean_type],
                      clip_sample=clip)
    sched.alphas_cumprod = torch.from_numpy(ABAR)
  else:
    sched = scheduler(diffusers.EulerDiscreteScheduler, timestep_spacing=spacing,
                      use_karras_sigmas=use_karras, prediction_type=PRED[mean_type],
                      final_sigmas_type=final)
  sched.set_timesteps(steps)
  times = sched.timesteps.numpy().astype(np.float64)
  levels = sched.sigmas.numpy().astype(np.float64)
  if method == "heun":  # [t0, t1, t1, ...], [s0, s1, s1, ..., 0]: one of each
    times, levels = np.append(times[:1], times[1::2]), np.append(levels[:1], levels[1::2])
  if float64 and method == "heun":  # diffusers' own grid recomputed in float64
    sigmas = np.sqrt((1 - ABAR) / ABAR)
    if use_karras:
      levels = np.append(ts.karras_sigmas(sigmas[0], sigmas[-1], steps), 0.0)
      log_s = np.log(sigmas)
      times = np.interp(np.log(levels[:-1]), log_s, np.arange(T))
    else:
      levels = np.append(np.interp(times, np.arange(T), sigmas), 0.0)
    sched.sigmas = torch.from_numpy(np.concatenate([levels[:1], np.repeat(levels[1:-1], 2),
                                                    levels[-1:]]))
    sched.timesteps = torch.from_numpy(np.append(times[:1], np.repeat(times[1:], 2)))
  end_t = 0.0 if final == "sigma_min" else float("nan")
  return sched, ts.grid_from_karras_sigmas(times, levels, end_timestep=end_t)


@pytest.mark.parametrize("case,float64", [(c, f) for c in KARRAS for f in (False, True)
                                           if not (f and c[0] == "euler")], ids=str)
def test_karras_samplers_match_diffusers(case, float64):
  """EulerDiscreteScheduler rounds the sample to float32 in step(): float32 only (under
  x64 Euler is checked against the reference below)."""
  method, _, _, mean_type, _, clip, _ = case
  sched, grid = _karras_scheduler(*case, float64=float64)
  dtype = jnp.float64 if float64 else jnp.float32
  with jax.enable_x64(float64):
    out = karras.solve(jax_model(), schedule(dtype), jnp.asarray(X, dtype), grid,
                       method=method, model_mean_type=mean_type,
                       transform=denoiser.X0Transform(clip=clip), trajectory=True)
  scale = np.sqrt(1.0 + grid.karras_sigmas**2).reshape((-1, 1, 1, 1, 1))
  x_ve = X * scale[0]
  theirs = run_diffusers(sched, x_ve if float64 else x_ve.astype(np.float32),
                         torch.float64 if float64 else torch.float32, heun=method == "heun")
  assert len(theirs) == grid.num_steps + 1
  assert max_step_error(np.asarray(out) * scale, theirs) <= (1e-10 if float64 else 1e-5)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("spacing,final,churn,mean_type", [
    ("karras", "zero", 0.0, "eps"), ("karras", "zero", 4.0, "v"),
    ("logsnr", "t0", 6.0, "x_start")])
def test_karras_samplers_match_reference_float64(method, spacing, final, churn, mean_type):
  """Karras et al.'s Algorithms 1 and 2 (churn within [0.05, 50], S_noise 1.003)."""
  with jax.enable_x64(True):
    grid = ts.make_grid(BETAS, 8, spacing, final_step=final)
    stoch = karras.make_churn(BETAS, grid, churn, 0.05, 50.0, 1.003) if churn else None
    out = karras.solve(jax_model(), schedule(jnp.float64), jnp.asarray(X), grid,
                       method=method, churn=stoch, keys=KEYS, model_mean_type=mean_type,
                       trajectory=True)
    noises = [_noise(i, jnp.float64) for i in range(grid.num_steps)]
  levels = grid.karras_sigmas
  if churn:  # the raised levels' timesteps, by the reference's own interpolation
    hat_t = [float(np.interp(-np.log1p((s * (1 + g))**2), np.log(ABAR)[::-1],
                             np.arange(T)[::-1])) if g else t
             for s, g, t in zip(levels, stoch.gammas, grid.timesteps)]
    np.testing.assert_allclose(stoch.hat_timesteps, hat_t, rtol=1e-12)
    assert np.sum(stoch.gammas > 0) >= 3

  def denoise(y, s, t):
    a = 1.0 / np.sqrt(1.0 + s * s)
    return ref.predict_x0_eps(np_model(y * a, np.full(B, t)), y * a, a, s * a, mean_type)[0]

  scale = np.sqrt(1.0 + levels**2)
  expected = ref.karras_sampler(
      X * scale[0], list(levels), list(grid.timesteps), denoise, method == "heun",
      (stoch.gammas, stoch.hat_timesteps, 1.003) if churn else None, noises)
  assert max_step_error(np.asarray(out) * scale.reshape(-1, 1, 1, 1, 1), expected) <= 1e-10


# --- Respaced ancestral: DDPMScheduler with a subsequence -----------------------------
# (variance type, mean type, clip, spacing, steps, threshold)
RESPACED = [
    ("fixedsmall", "eps", True, "even", 10, None),
    ("fixedlarge", "v", False, "uniform", 8, None),
    ("learned_range", "x_start", True, "even", 12, None),
    ("fixedsmall", "eps", False, "uniform", 10, (0.9, 1.3)),
]
DIFFUSERS_VARIANCE = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large",
                      "learned_range": "learned_range"}


def _noise(index, dtype):
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, index), (np.prod(SHAPE),), dtype)
  return np.asarray(jax.vmap(draw)(KEYS), np.float64).reshape((B,) + SHAPE)


@pytest.mark.parametrize("case", RESPACED, ids=str)
@pytest.mark.parametrize("float64", [False, True])
def test_respaced_matches_ddpm_scheduler(case, float64, monkeypatch):
  var_type, mean_type, clip, spacing, steps, threshold = case
  seq = ts.model_timesteps(BETAS, steps, spacing).astype(np.int64)  # decreasing
  dtype, tdtype = (jnp.float64, torch.float64) if float64 else (jnp.float32, torch.float32)
  kw = dict(thresholding=True, dynamic_thresholding_ratio=threshold[0],
            sample_max_value=threshold[1]) if threshold else {}
  sched = scheduler(diffusers.DDPMScheduler, variance_type=DIFFUSERS_VARIANCE[var_type],
                    prediction_type=PRED[mean_type], clip_sample=clip, **kw)
  sched.set_timesteps(timesteps=list(seq))
  if float64:
    sched.one = torch.tensor(1.0, dtype=torch.float64)
  transform = denoiser.X0Transform(clip=clip, threshold_ratio=threshold[0],
                                   threshold_max=threshold[1]) if threshold else \
      denoiser.X0Transform(clip=clip)
  learned = var_type == "learned_range"
  with jax.enable_x64(float64):
    spaced = respacing.respace(BETAS, seq[::-1], dtype)
    out = respacing.sample(jax_model(learned), schedule(dtype), spaced, KEYS, SHAPE,
                           model_mean_type=mean_type, model_var_type=var_type,
                           transform=transform, trajectory=True)
    noises = {int(t): _noise(int(t), dtype) for t in seq}
    x_T = _noise(T, dtype)
  step_noise = iter([noises[int(t)] for t in seq if t > 0])
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                      lambda *a, **k: nchw(next(step_noise)).to(tdtype))
  theirs = run_diffusers(sched, x_T, tdtype, learned=learned)
  assert max_step_error(out, theirs) <= (1e-10 if float64 else 1e-5)
