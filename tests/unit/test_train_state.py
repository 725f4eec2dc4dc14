"""Optimizer and train state against float64 NumPy references written here."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from diffusion_jax.training import optimizer
from diffusion_jax.training import train_state as ts


def _optim_config(**kw):
  c = ml_collections.ConfigDict(dict(learning_rate=2e-4, warmup_steps=4, grad_clip_norm=1.0,
                                     beta1=0.9, beta2=0.999, eps=1e-8, ema_decay=0.9999))
  c.update(kw)
  return c


def _reference_adam(params, grads_seq, lr, warmup, clip, b1, b2, eps):
  """Float64 Adam: clip by global norm, bias-corrected moments, lr * min(step/warmup, 1)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for step, grads in enumerate(grads_seq):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    if clip > 0 and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    rate = lr * min(step / warmup, 1.0) if warmup else lr
    for k in p:
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat = m[k] / (1 - b1 ** (step + 1))
      v_hat = v[k] / (1 - b2 ** (step + 1))
      p[k] = p[k] - rate * m_hat / (np.sqrt(v_hat) + eps)
  return p


@pytest.mark.parametrize("warmup,clip", [(4, 1.0), (0, 0.0)])
def test_optimizer_matches_float64_adam(warmup, clip):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 3)).astype(np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32)}
  # Mix of large gradients (clipped) and small ones (not clipped).
  grads_seq = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in params.items()}
               for s in (3.0, 0.05, 2.0, 0.01, 0.5, 4.0, 0.02)]
  config = _optim_config(warmup_steps=warmup, grad_clip_norm=clip, learning_rate=1e-2)
  tx = optimizer.make_optimizer(config)
  state = ts.create_train_state(jax.tree_util.tree_map(jnp.asarray, params), tx)
  for grads in grads_seq:
    state = ts.apply_gradients(state, jax.tree_util.tree_map(jnp.asarray, grads), tx, 0.9)
  want = _reference_adam(params, grads_seq, 1e-2, warmup, clip, 0.9, 0.999, 1e-8)
  for k in params:
    np.testing.assert_allclose(np.asarray(state.params[k]), want[k], rtol=1e-5, atol=1e-6)
  assert int(state.step) == len(grads_seq)


def test_learning_rate_schedule_is_linear_warmup_then_constant():
  sched = optimizer.learning_rate_schedule(_optim_config(learning_rate=2e-4, warmup_steps=5000))
  for step in (0, 1, 2500, 4999, 5000, 5001, 800_000):
    np.testing.assert_allclose(float(sched(step)), 2e-4 * min(step / 5000, 1.0), rtol=1e-6)
  # The rate of the next update follows the optimizer state's own update count.
  config = _optim_config(learning_rate=2e-4, warmup_steps=10)
  tx = optimizer.make_optimizer(config)
  state = ts.create_train_state({"w": jnp.ones(3)}, tx, step=500)
  assert float(optimizer.current_learning_rate(config, state.opt_state)) == 0.0
  for _ in range(3):
    state = ts.apply_gradients(state, {"w": jnp.ones(3)}, tx, 0.9)
  np.testing.assert_allclose(float(optimizer.current_learning_rate(config, state.opt_state)),
                             2e-4 * 3 / 10, rtol=1e-6)
  with pytest.raises(ValueError, match="make_optimizer"):
    optimizer.current_learning_rate(config, (optax.EmptyState(),))
  const = optimizer.learning_rate_schedule(_optim_config(warmup_steps=0))
  assert float(const(0)) == pytest.approx(2e-4)
  with pytest.raises(ValueError, match="warmup_steps"):
    optimizer.learning_rate_schedule(_optim_config(warmup_steps=-1))


def test_ema_starts_as_copy_and_follows_decay():
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  tx = optimizer.make_optimizer(_optim_config(warmup_steps=0, learning_rate=0.1))
  state = ts.create_train_state(params, tx)
  np.testing.assert_array_equal(state.ema_params["w"], params["w"])
  assert state.ema_params["w"] is not params["w"]
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  decay = 0.9
  ema_ref = np.asarray(params["w"], np.float64)
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = {"w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)}
    state = ts.apply_gradients(state, grads, tx, decay)
    ema_ref = decay * ema_ref + (1 - decay) * np.asarray(state.params["w"], np.float64)
  np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema_ref, rtol=1e-6)


def test_create_train_state_given_ema_and_step_and_pytree():
  params = {"w": jnp.ones((2,))}
  tx = optimizer.make_optimizer(_optim_config())
  state = ts.create_train_state(params, tx, ema_params={"w": jnp.zeros((2,))}, step=7)
  assert int(state.step) == 7
  np.testing.assert_array_equal(state.ema_params["w"], np.zeros(2))
  leaves = jax.tree_util.tree_leaves(state)  # A plain pytree that jit can see through.
  assert all(isinstance(x, jax.Array) for x in leaves)
  doubled = jax.jit(lambda s: s.replace(step=s.step * 2))(state)
  assert int(doubled.step) == 14
  with pytest.raises(ValueError, match="tree structure"):
    ts.create_train_state(params, tx, ema_params={"v": jnp.ones((2,))})


@pytest.mark.parametrize("decay", [0.9, 0.999])
def test_debiased_ema_is_the_normalized_average_of_the_updates(decay):
  """optim.ema_debias: after n updates the EMA is sum_k decay^(n-k) theta_k over the
  parameters after updates 1..n, divided by the sum of the weights (float64 reference);
  the initialization has no share, and resuming at any step gives the same values."""
  params = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(4,)), jnp.float32)}
  tx = optimizer.make_optimizer(_optim_config(warmup_steps=0, learning_rate=0.5))
  state = ts.create_train_state(params, tx)
  rng = np.random.default_rng(3)
  history = []
  for n in range(1, 13):
    grads = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    state = ts.apply_gradients(state, grads, tx, decay, ema_debias=True)
    history.append(np.asarray(state.params["w"], np.float64))
    weights = decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
    want = np.einsum("k,kd->d", weights, np.stack(history)) / weights.sum()
    np.testing.assert_allclose(np.asarray(state.ema_params["w"]), want, rtol=2e-5,
                               atol=2e-6)
  assert float(ts.debiased_decay(decay, 1)) == 0.0
  # Long runs: the decay tends to the plain one (no float32 trouble at large n).
  np.testing.assert_allclose(float(ts.debiased_decay(decay, 800_000)), decay, rtol=1e-7)
  n = 5000
  want = decay * (1 - decay ** (n - 1)) / (1 - decay ** n)
  np.testing.assert_allclose(float(ts.debiased_decay(decay, n)), want, rtol=1e-6)
  # The plain EMA keeps the initialization's share decay^n.
  plain = ts.create_train_state(params, tx)
  plain = ts.apply_gradients(plain, grads, tx, decay)
  np.testing.assert_allclose(
      np.asarray(plain.ema_params["w"]),
      decay * np.asarray(params["w"], np.float64)
      + (1 - decay) * np.asarray(plain.params["w"], np.float64), rtol=1e-6)
