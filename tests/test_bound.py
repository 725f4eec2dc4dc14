"""The full variational bound (calc_bpd) vs a per-timestep float64 reference loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ddpm_reference as ref
from diffusion_jax import bound
from diffusion_jax import schedules

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


@functools.lru_cache(maxsize=None)
def compiled(mean_type, var_type, clip, t_chunk, dtype_name):
  s = schedules.make_schedule(schedules.get_beta_schedule(*BETA), jnp.dtype(dtype_name))
  return jax.jit(lambda x, k: bound.calc_bpd(
      jnp_model(var_type), s, x, k, model_mean_type=mean_type, model_var_type=var_type,
      clip_denoised=clip, t_chunk=t_chunk))


@pytest.mark.parametrize("mean_type,var_type,clip,t_chunk", [
    ("eps", "fixedlarge", False, 1), ("x_start", "learned_range", True, 5),
    ("v", "fixedsmall", True, 20), ("mean", "learned_range", False, 4)])
def test_calc_bpd_float64_matches_reference(mean_type, var_type, clip, t_chunk):
  x0, keys = data()
  with jax.enable_x64(True):
    expected = reference_bound(x0, keys, mean_type, var_type, clip)
    out = compiled(mean_type, var_type, clip, t_chunk, "float64")(x0, keys)
    for key, value in expected.items():
      assert out[key].dtype == jnp.float64 and out[key].shape == value.shape, key
      assert rel_err(out[key], value) <= 1e-10, key


def test_calc_bpd_float32_path():
  x0, keys = data(seed=1)
  out = compiled("eps", "learned_range", False, 4, "float32")(x0.astype(np.float32), keys)
  assert out["total_bpd"].dtype == jnp.float32
  with jax.enable_x64(True):
    expected = reference_bound(x0, keys, "eps", "learned_range", False, jnp.float32)
  # Bits/dim are sums of O(1) terms per dim: float32 leaves a few u of absolute error.
  for key, value in expected.items():
    np.testing.assert_allclose(out[key], value, rtol=1e-5, atol=64 * ref.U32, err_msg=key)


def test_calc_bpd_sharded_and_vmapped_match_unsharded():
  x0, keys = data(batch=16, seed=2)
  x0 = x0.astype(np.float32)
  f = compiled("eps", "fixedlarge", True, 2, "float32")
  single = jax.device_get(f(x0, keys))
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  assert mesh.size == 8
  sharding = NamedSharding(mesh, P("batch"))
  sharded = f(jax.device_put(x0, sharding), jax.device_put(keys, sharding))
  assert sharded["total_bpd"].sharding.is_equivalent_to(sharding, 1)
  for key, value in single.items():
    np.testing.assert_allclose(sharded[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  s = schedules.make_schedule(schedules.get_beta_schedule(*BETA))
  vmapped = jax.jit(jax.vmap(lambda x, k: bound.calc_bpd(
      jnp_model("fixedlarge"), s, x, k, model_mean_type="eps", model_var_type="fixedlarge",
      clip_denoised=True, t_chunk=2)))(x0.reshape(2, 8, 4, 4, 3), keys.reshape(2, 8))
  # Each example depends on its own key only: two vmapped halves give the same numbers.
  for key, value in single.items():
    np.testing.assert_allclose(vmapped[key].reshape(value.shape), value, rtol=1e-6,
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
