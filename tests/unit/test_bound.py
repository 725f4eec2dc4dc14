"""The full variational bound (calc_bpd) vs a per-timestep float64 reference loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ddpm_reference as ref
from diffusion_jax.diffusion import bound
from diffusion_jax.diffusion import schedules

T = 20
BETA = ("linear", T, 1e-3, 0.3)  # Short chain that still ends near N(0, I).


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def jnp_model(var_type):
  def model_fn(x, t):
    w = 0.5 + 0.4 * jnp.cos(t.astype(x.dtype)).reshape(-1, 1, 1, 1)
    mean = w * jnp.tanh(x) + 0.1 * x
    if var_type == "learned_range":
      return jnp.concatenate([mean, jnp.tanh(0.7 * x)], -1)
    return mean
  return model_fn


def np_model(var_type):
  def model(x, t):
    w = 0.5 + 0.4 * np.cos(np.asarray(t, np.float64)).reshape(-1, 1, 1, 1)
    mean = w * np.tanh(x) + 0.1 * x
    return np.concatenate([mean, np.tanh(0.7 * x)], -1) if var_type == "learned_range" else mean
  return model


@functools.partial(jax.jit, static_argnums=(2, 3))
def noise_at(keys, t, shape, dtype):
  """The documented noise convention: example b at timestep t uses fold_in(keys[b], t)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, t), shape, dtype))(keys)


def reference_bound(x0, keys, mean_type, var_type, clip, noise_dtype=jnp.float64):
  """The bound term by term in float64 (the noise drawn at `noise_dtype`)."""
  c = ref.coefficients(ref.betas(*BETA))
  model = np_model(var_type)
  terms, mse = [], []
  for t in range(T):
    eps = np.asarray(noise_at(keys, t, x0.shape[1:], noise_dtype), np.float64)
    tb = np.full(x0.shape[0], t)
    xt = ref.q_sample(c, x0, tb, eps)
    term, px0 = ref.vb_term(c, model(xt, tb), x0, xt, tb, mean_type, var_type, clip)
    terms.append(term)
    mse.append(ref.flat_mean((px0 - x0)**2))
  terms, mse = np.stack(terms, 1), np.stack(mse, 1)
  prior = ref.prior_bits(c, x0)
  return {"total_bpd": terms.sum(1) + prior, "prior_bpd": prior, "decoder_bpd": terms[:, 0],
          "kl_bpd": terms[:, 1:].sum(1), "terms_bpd": terms, "mse": mse}


def data(batch=8, seed=0):
  x0 = np.random.default_rng(seed).integers(0, 256, (batch, 4, 4, 3)) / 127.5 - 1.0
  keys = jax.random.split(jax.random.key(seed), batch)
  return x0, keys


CONFIGS = [("eps", "fixedlarge", False, 1), ("x_start", "learned_range", True, 5),
           ("v", "fixedsmall", True, 20), ("mean", "learned_range", False, 4)]


def _bounds(x, keys, dtype, configs):
  s = schedules.make_schedule(schedules.get_beta_schedule(*BETA), dtype)
  return [bound.calc_bpd(jnp_model(var_type), s, x, keys, model_mean_type=mean_type,
                         model_var_type=var_type, clip_denoised=clip, t_chunk=t_chunk)
          for mean_type, var_type, clip, t_chunk in configs]


@functools.lru_cache(maxsize=None)
def float64_runs():
  """All configurations in one compiled float64 program (one compilation)."""
  x0, keys = data()
  with jax.enable_x64(True):
    return jax.device_get(jax.jit(lambda x, k: _bounds(x, k, jnp.float64, CONFIGS))(x0, keys))


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_calc_bpd_float64_matches_reference(i):
  mean_type, var_type, clip, _ = CONFIGS[i]
  x0, keys = data()
  out = float64_runs()[i]
  with jax.enable_x64(True):
    expected = reference_bound(x0, keys, mean_type, var_type, clip)
  for key, value in expected.items():
    assert out[key].dtype == np.float64 and out[key].shape == value.shape, key
    assert rel_err(out[key], value) <= 1e-10, key


SHARD_X0, SHARD_KEYS = data(batch=16, seed=2)
SHARD_X0 = SHARD_X0.astype(np.float32)
SHARD_CONFIG = [("eps", "learned_range", True, 4)]
shard_fn = lambda x, k: _bounds(x, k, jnp.float32, SHARD_CONFIG)[0]


@functools.lru_cache(maxsize=None)
def float32_run():
  return jax.device_get(jax.jit(shard_fn)(SHARD_X0, SHARD_KEYS))


def test_calc_bpd_float32_path():
  out = float32_run()
  assert out["total_bpd"].dtype == np.float32
  with jax.enable_x64(True):
    expected = reference_bound(SHARD_X0, SHARD_KEYS, "eps", "learned_range", True,
                               jnp.float32)
  # Bits/dim are sums of O(1) terms per dim: float32 leaves a few u of absolute error.
  for key, value in expected.items():
    np.testing.assert_allclose(out[key], value, rtol=1e-5, atol=64 * ref.U32, err_msg=key)


def test_calc_bpd_sharded_and_vmapped_match_unsharded():
  """vmap over 2 groups of 8 examples, each group spread over 8 devices, gives the
  unsharded numbers: an example's result depends on its own key only."""
  single = float32_run()
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8
  sharding = NamedSharding(mesh, P(None, "batch"))
  put = lambda a: jax.device_put(a.reshape((2, 8) + a.shape[1:]), sharding)
  out = jax.jit(jax.vmap(shard_fn))(put(SHARD_X0), put(SHARD_KEYS))
  assert out["total_bpd"].sharding.is_equivalent_to(sharding, 2)
  for key, value in single.items():
    np.testing.assert_allclose(np.asarray(out[key]).reshape(value.shape), value, rtol=1e-6,
                               atol=1e-7, err_msg=key)


def test_calc_bpd_errors():
  x0, keys = data()
  s = schedules.make_schedule(schedules.get_beta_schedule(*BETA))
  kwargs = dict(model_mean_type="eps", model_var_type="fixedlarge")
  with pytest.raises(ValueError, match="t_chunk=3 must be a positive integer dividing T=20"):
    bound.calc_bpd(jnp_model("fixedlarge"), s, x0, keys, t_chunk=3, **kwargs)
  with pytest.raises(ValueError, match="Got 4 keys for a batch of 8"):
    bound.calc_bpd(jnp_model("fixedlarge"), s, x0, keys[:4], **kwargs)
  with pytest.raises(ValueError, match="one PRNG key per example"):
    bound.calc_bpd(jnp_model("fixedlarge"), s, x0, jnp.zeros(8), **kwargs)
