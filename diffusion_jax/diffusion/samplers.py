"""Samplers of the reverse process, each one compiled loop (`lax.fori_loop`).

All samplers are pure functions meant to be wrapped in `jax.jit` by the caller (close
over the model parameters in `model_fn` or pass them through a `functools.partial`);
every loop over timesteps is a single `lax.fori_loop`, never a Python loop.

Randomness is per example (see `randomness`): `keys` holds one PRNG key per example; the
initial x_T of example b comes from `fold_in(keys[b], T)` and the noise added at
timestep t from `fold_in(keys[b], t)`. A sample therefore depends on its own key only
(not on the batch or its sharding), and DDIM with eta = 1 over all T steps uses exactly
the noise of ancestral sampling (they then agree up to rounding with fixedsmall).

`model_fn(x_t [B, H, W, C], t [B] int32) -> [B, H, W, C or 2C]`; samples come out in the
schedule's dtype; timestep index t = 0 is the paper's t = 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import streams
from diffusion_jax.diffusion import process
from diffusion_jax.diffusion import randomness
from diffusion_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_types(model_mean_type: str, model_var_type: str) -> None:
  process.check_mean_type(model_mean_type)
  process.check_var_type(model_var_type)


def _check_timestep(name: str, t, num_timesteps: int) -> int:
  if not isinstance(t, (int, np.integer)) or not 0 <= t < num_timesteps:
    raise ValueError(f"{name} must be a Python int in [0, {num_timesteps}), got {t!r}.")
  return int(t)


def initial_noise(schedule: Schedule, keys: jax.Array, shape: Sequence[int]) -> jax.Array:
  """x_T [B, *shape] ~ N(0, I) of each example from fold_in(keys[b], T)."""
  if (not isinstance(shape, (tuple, list)) or
      not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
    raise ValueError(f"shape must be the per-sample shape, e.g. (H, W, C), got {shape!r}.")
  shape = tuple(int(s) for s in shape)
  return randomness.per_example_normal(keys, schedule.num_timesteps, shape, schedule.dtype)


def p_sample(model_fn: ModelFn, schedule: Schedule, x: jax.Array, t, keys: jax.Array, *,
             model_mean_type: str, model_var_type: str, clip_denoised: bool):
  """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4), no noise at t = 0.

  Args:
    model_fn: the denoising model.
    schedule: the diffusion's coefficients.
    x: [B, H, W, C] the current x_t.
    t: int32 scalar timestep (shared by the batch).
    keys: [B] PRNG keys; the noise comes from fold_in(keys[b], t).
    model_mean_type: one of `process.MEAN_TYPES`.
    model_var_type: one of `process.VAR_TYPES`.
    clip_denoised: clip the predicted x_0 to [-1, 1].

  Returns:
    (x_{t-1} [B, H, W, C], pred_xstart [B, H, W, C]).
  """
  t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)
  out = process.p_mean_variance(
      schedule, model_fn(x, t_b), x, t_b, model_mean_type=model_mean_type,
      model_var_type=model_var_type, clip_denoised=clip_denoised)
  noise = randomness.per_example_normal(keys, t, x.shape[1:], x.dtype)
  x_prev = out.mean + jnp.where(t > 0, jnp.exp(0.5 * out.log_variance) * noise, 0.0)
  return x_prev.astype(x.dtype), out.pred_xstart


def denoise_from(model_fn: ModelFn, schedule: Schedule, x_t: jax.Array, t_start: int,
                 keys: jax.Array, *, model_mean_type: str = "eps",
                 model_var_type: str = "fixedlarge",
                 clip_denoised: bool = True) -> jax.Array:
  """Runs the ancestral reverse process from x_t at index `t_start` down to x_0.

  Applies the model at timesteps t_start, t_start - 1, ..., 0. With t_start = T - 1 and
  x_t drawn from fold_in(keys[b], T) this is `ancestral_sample`.

  Args:
    model_fn: the denoising model.
    schedule: the diffusion's coefficients.
    x_t: [B, H, W, C] the latent fed to the model at index t_start (e.g. q_sample(x_0,
      t_start), or an intermediate state of another chain).
    t_start: Python int in [0, T).
    keys: [B] PRNG keys, one per example.
    model_mean_type, model_var_type, clip_denoised: see `p_sample`.

  Returns:
    [B, H, W, C] samples of x_0 in the schedule's dtype.
  """
  _check_types(model_mean_type, model_var_type)
  t_start = _check_timestep("t_start", t_start, schedule.num_timesteps)
  keys = randomness.as_key_array(keys, x_t.shape[0])
  x_t = jnp.asarray(x_t).astype(schedule.dtype)  # The schedule's dtype is the compute dtype.

  def body(i, x):
    x, _ = p_sample(model_fn, schedule, x, t_start - i, keys,
                    model_mean_type=model_mean_type, model_var_type=model_var_type,
                    clip_denoised=clip_denoised)
    return x

  return jax.lax.fori_loop(0, t_start + 1, body, x_t)


def ancestral_sample(model_fn: ModelFn, schedule: Schedule, keys: jax.Array,
                     shape: Sequence[int], *, model_mean_type: str = "eps",
                     model_var_type: str = "fixedlarge",
                     clip_denoised: bool = True) -> jax.Array:
  """Algorithm 2: x_T ~ N(0, I), then T ancestral steps; the last step adds no noise.

  Args:
    model_fn: the denoising model.
    schedule: the diffusion's coefficients.
    keys: [B] PRNG keys, one per sample.
    shape: the per-sample shape (H, W, C).
    model_mean_type, model_var_type, clip_denoised: see `p_sample`.

  Returns:
    [B, H, W, C] samples in the schedule's dtype.
  """
  _check_types(model_mean_type, model_var_type)
  keys = randomness.as_key_array(keys)
  x_T = initial_noise(schedule, keys, shape)
  return denoise_from(model_fn, schedule, x_T, schedule.num_timesteps - 1, keys,
                      model_mean_type=model_mean_type, model_var_type=model_var_type,
                      clip_denoised=clip_denoised)


def progressive_sample(model_fn: ModelFn, schedule: Schedule, keys: jax.Array,
                       shape: Sequence[int], *, every: int = 100,
                       model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
                       clip_denoised: bool = True) -> dict:
  """Ancestral sampling that also records x_t and the predicted x_0 (Figs. 6, 10).

  Snapshots are taken at the timesteps t with t % every == 0, in sampling order
  (largest t first, t = 0 last); the final predicted x_0 equals the sample.

  Args:
    model_fn, schedule, keys, shape, model_mean_type, model_var_type, clip_denoised:
      as `ancestral_sample`.
    every: the snapshot period in timesteps (>= 1).

  Returns:
    A dict: "sample" [B, H, W, C]; "pred_xstart" [B, N, H, W, C] and "x_t"
    [B, N, H, W, C] (the model input at each snapshot); "timesteps" [N] (NumPy ints).
  """
  _check_types(model_mean_type, model_var_type)
  num_timesteps = schedule.num_timesteps
  if not isinstance(every, (int, np.integer)) or every < 1:
    raise ValueError(f"every must be a positive integer, got {every!r}.")
  snap_ts = np.arange(0, num_timesteps, every)[::-1]
  num_snaps = len(snap_ts)
  keys = randomness.as_key_array(keys)
  x = initial_noise(schedule, keys, shape)
  buf = jnp.zeros((x.shape[0], num_snaps) + x.shape[1:], x.dtype)  # [B, N, H, W, C]

  def record(buf, value, t):
    slot = num_snaps - 1 - t // every
    current = jax.lax.dynamic_index_in_dim(buf, slot, axis=1, keepdims=False)
    value = jnp.where(t % every == 0, value.astype(buf.dtype), current)
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot, axis=1)

  def body(i, carry):
    x, preds, inputs = carry
    t = num_timesteps - 1 - i
    x_prev, pred = p_sample(model_fn, schedule, x, t, keys, model_mean_type=model_mean_type,
                            model_var_type=model_var_type, clip_denoised=clip_denoised)
    return x_prev, record(preds, pred, t), record(inputs, x, t)

  x, preds, inputs = jax.lax.fori_loop(0, num_timesteps, body, (x, buf, buf))
  return {"sample": x, "pred_xstart": preds, "x_t": inputs, "timesteps": snap_ts}


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform") -> np.ndarray:
  """An increasing subsequence of [0, T) of about `num_steps` timesteps for DDIM.

  Args:
    num_timesteps: T.
    num_steps: the length S of the subsequence, 1 <= S <= T.
    spacing: "uniform" (0, k, 2k, ..., k = T // S; the DDIM paper's), "linspace"
      (rounded linspace from 0 to T - 1, includes the last step) or "quad" (the DDIM
      paper's quadratic spacing up to 0.8 T; its repeated timesteps, which would be
      identity steps, are dropped, so it may return fewer than S).

  Returns:
    [S'] int64 timesteps, strictly increasing.

  Raises:
    ValueError: for an unknown spacing, or S outside [1, T].
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps={num_steps} must be in [1, T={num_timesteps}].")
  if spacing == "uniform":
    seq = np.arange(num_steps) * (num_timesteps // num_steps)
  elif spacing == "linspace":
    seq = np.round(np.linspace(0, num_timesteps - 1, num_steps))
  elif spacing == "quad":
    seq = np.floor(np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps)**2)
  else:
    raise ValueError(f"Unknown spacing {spacing!r}; use 'uniform', 'linspace' or 'quad'.")
  return np.unique(seq.astype(np.int64))


def ddim_sample(model_fn: ModelFn, schedule: Schedule, keys: jax.Array,
                shape: Sequence[int], *, timesteps: Sequence[int] | None = None,
                eta: float = 0.0, model_mean_type: str = "eps",
                model_var_type: str = "fixedlarge", clip_denoised: bool = True,
                eps_from_clipped_x0: bool = False) -> jax.Array:
  """DDIM (Song et al. 2021) over an increasing subsequence tau of the timesteps.

  Each step goes from tau_i to tau_{i-1} (to x_0 after tau_0):
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev),
  with z from fold_in(keys[b], tau_i). With `clip_denoised`, x0_hat is clipped to
  [-1, 1]; eps_hat is the model's own prediction (derived from the unclipped x_0 for the
  other parameterizations), as diffusers' DDIMScheduler does by default, or, with
  `eps_from_clipped_x0`, re-derived from the clipped x0_hat (diffusers'
  `use_clipped_model_output`). The default is the robust one: a re-derived eps carries
  the clipped-off excess forward as noise, which leaves visible noise in the samples of
  an imperfect network. eta = 0 is deterministic; eta = 1 over all T steps is ancestral
  sampling with the posterior variance ("fixedsmall") when nothing is clipped, or with
  `eps_from_clipped_x0`. A learned variance output is ignored.

  Args:
    model_fn, schedule, keys, shape, model_mean_type, model_var_type, clip_denoised:
      as `ancestral_sample`.
    timesteps: the subsequence tau (strictly increasing ints in [0, T)), e.g. from
      `ddim_timesteps`; None means all T timesteps.
    eta: the stochasticity (a float or a float scalar array).
    eps_from_clipped_x0: re-derive eps_hat from the clipped x0_hat (see above).

  Returns:
    [B, H, W, C] samples in the schedule's dtype.
  """
  _check_types(model_mean_type, model_var_type)
  num_timesteps = schedule.num_timesteps
  seq = np.arange(num_timesteps) if timesteps is None else np.asarray(timesteps)
  if (seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer) or
      seq[0] < 0 or seq[-1] >= num_timesteps or np.any(np.diff(seq) <= 0)):
    raise ValueError("timesteps must be a non-empty, strictly increasing sequence of "
                     f"ints in [0, {num_timesteps}), e.g. ddim_timesteps(T, S).")
  prev = np.concatenate([[-1], seq[:-1]])
  seq_j, prev_j = jnp.asarray(seq, jnp.int32), jnp.asarray(prev, jnp.int32)
  deterministic = isinstance(eta, (int, float)) and eta == 0
  keys = randomness.as_key_array(keys)
  x = initial_noise(schedule, keys, shape)
  log_abar = schedule.log_alphas_cumprod

  def body(i, x):
    j = len(seq) - 1 - i
    t, t_prev = seq_j[j], prev_j[j]
    t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)
    mean_output, _ = process.split_model_output(model_fn(x, t_b), x, model_var_type)
    x0, eps = process.predict_xstart_and_eps(
        schedule, mean_output, x, t_b, model_mean_type=model_mean_type,
        clip_denoised=clip_denoised and eps_from_clipped_x0)
    if clip_denoised and not eps_from_clipped_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    has_prev = t_prev >= 0
    t_prev_c = jnp.maximum(t_prev, 0)
    log_abar_prev = jnp.where(has_prev, log_abar[t_prev_c], 0.0)
    sqrt_abar_prev = jnp.where(has_prev, schedule.sqrt_alphas_cumprod[t_prev_c], 1.0)
    one_minus_prev = -jnp.expm1(log_abar_prev)
    direction = one_minus_prev
    if not deterministic:
      sigma2 = (eta**2 * one_minus_prev / -jnp.expm1(log_abar[t]) *
                -jnp.expm1(log_abar[t] - log_abar_prev))
      direction = jnp.maximum(one_minus_prev - sigma2, 0.0)
    x_prev = sqrt_abar_prev * x0 + jnp.sqrt(direction) * eps
    if not deterministic:
      noise = randomness.per_example_normal(keys, t, x.shape[1:], x.dtype)
      x_prev = x_prev + jnp.sqrt(sigma2) * noise
    return x_prev.astype(x.dtype)

  return jax.lax.fori_loop(0, len(seq), body, x)


def sample_completions(model_fn: ModelFn, schedule: Schedule, keys: jax.Array,
                       shape: Sequence[int], *, t_split: int, num_completions: int,
                       model_mean_type: str = "eps", model_var_type: str = "fixedlarge",
                       clip_denoised: bool = True) -> dict:
  """Several stochastic completions x_0 ~ p(x_0 | x_t) of one shared latent (Fig. 7).

  One chain per example runs from x_T (its own keys, exactly as `ancestral_sample`) down
  to the latent at index `t_split` (the model input at t_split; t_split = T - 1 shares
  only x_T). There it splits into `num_completions` chains; completion j of example b
  draws its noise from keys fold_in(fold_in(keys[b], T + 1), j).

  Args:
    model_fn, schedule, keys, shape, model_mean_type, model_var_type, clip_denoised:
      as `ancestral_sample`.
    t_split: Python int in [0, T), where the chain splits.
    num_completions: M >= 1 completions per example.

  Returns:
    A dict: "x_t" [B, H, W, C] the shared latents and "samples" [B, M, H, W, C].
  """
  _check_types(model_mean_type, model_var_type)
  num_timesteps = schedule.num_timesteps
  t_split = _check_timestep("t_split", t_split, num_timesteps)
  if not isinstance(num_completions, (int, np.integer)) or num_completions < 1:
    raise ValueError(f"num_completions must be a positive int, got {num_completions!r}.")
  kwargs = dict(model_mean_type=model_mean_type, model_var_type=model_var_type,
                clip_denoised=clip_denoised)
  keys = randomness.as_key_array(keys)
  x = initial_noise(schedule, keys, shape)

  def body(i, x):
    return p_sample(model_fn, schedule, x, num_timesteps - 1 - i, keys, **kwargs)[0]

  x_t = jax.lax.fori_loop(0, num_timesteps - 1 - t_split, body, x)
  batch, image_shape = x_t.shape[0], x_t.shape[1:]
  sub_keys = randomness.derived_keys(
      keys, num_timesteps + streams.COMPLETION, num_completions)  # [B, M]
  x_rep = jnp.broadcast_to(x_t[:, None], (batch, num_completions) + image_shape)
  samples = denoise_from(model_fn, schedule, x_rep.reshape((-1,) + image_shape), t_split,
                         sub_keys.reshape(-1), **kwargs)
  return {"x_t": x_t, "samples": samples.reshape(x_rep.shape)}


def interpolate(model_fn: ModelFn, schedule: Schedule, x_a: jax.Array, x_b: jax.Array,
                keys: jax.Array, *, t: int, lambdas, model_mean_type: str = "eps",
                model_var_type: str = "fixedlarge", clip_denoised: bool = True) -> dict:
  """Interpolates two images through the latent space of q (Section 4.4, Figs. 8-9).

  x_t = q_sample(x_a, t, noise_a), x'_t = q_sample(x_b, t, noise_b) with noise from
  fold_in(fold_in(keys[b], T + 2), 0 / 1); each mix (1 - lambda) x_t + lambda x'_t is
  decoded by the ancestral reverse process from t with the same noise for every lambda
  (from keys[b], as in `denoise_from`), so only lambda varies along a row.

  Args:
    model_fn, schedule, model_mean_type, model_var_type, clip_denoised: as
      `ancestral_sample`.
    x_a: [B, H, W, C] source images in [-1, 1].
    x_b: [B, H, W, C] the images to interpolate towards.
    keys: [B] PRNG keys, one per pair.
    t: Python int in [0, T), the number of diffusion steps minus one (the paper's
      "t = 500" is t = 499 here).
    lambdas: [L] mixing weights, e.g. jnp.linspace(0, 1, 9).

  Returns:
    A dict: "samples" [B, L, H, W, C], and the two encodings "x_t_a", "x_t_b".
  """
  _check_types(model_mean_type, model_var_type)
  num_timesteps = schedule.num_timesteps
  t = _check_timestep("t", t, num_timesteps)
  if x_a.shape != x_b.shape:
    raise ValueError(f"x_a shape {x_a.shape} != x_b shape {x_b.shape}.")
  batch, image_shape = x_a.shape[0], x_a.shape[1:]
  keys = randomness.as_key_array(keys, batch)
  lambdas = jnp.asarray(lambdas, schedule.dtype)
  if lambdas.ndim != 1:
    raise ValueError(f"lambdas must be 1-D, got shape {lambdas.shape}.")
  enc_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(
      keys, num_timesteps + streams.ENCODER)
  t_b = jnp.full((batch,), t, dtype=jnp.int32)
  noise_a = randomness.per_example_normal(enc_keys, 0, image_shape, schedule.dtype)
  noise_b = randomness.per_example_normal(enc_keys, 1, image_shape, schedule.dtype)
  x_t_a = process.q_sample(schedule, x_a.astype(schedule.dtype), t_b, noise_a)
  x_t_b = process.q_sample(schedule, x_b.astype(schedule.dtype), t_b, noise_b)
  lam = lambdas.reshape((1, -1) + (1,) * len(image_shape))
  mixed = (1.0 - lam) * x_t_a[:, None] + lam * x_t_b[:, None]  # [B, L, H, W, C]
  rep_keys = jnp.repeat(keys, lambdas.shape[0])  # [B * L], shared along L
  samples = denoise_from(model_fn, schedule, mixed.reshape((-1,) + image_shape), t,
                         rep_keys, model_mean_type=model_mean_type,
                         model_var_type=model_var_type, clip_denoised=clip_denoised)
  return {"samples": samples.reshape(mixed.shape), "x_t_a": x_t_a, "x_t_b": x_t_b}
