"""The compiled data-parallel update: sharding invariance under the kernel policy, the
operations it lowers to, loss wiring, NaN guard."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.training import run_setup
from diffusion_jax.training import train_state as train_state_lib
from diffusion_jax.training import train_step as train_step_lib
import training_testlib


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  training_testlib.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  yield
  training_testlib.disable_compilation_cache()


@pytest.fixture(scope="module")
def built8():
  """The step over all 8 devices, as in training (it donates its input state)."""
  config = training_testlib.digits_smoke()  # The program train_and_evaluate compiles.
  assert config.model.dropout > 0  # Its draws must not depend on the sharding.
  mesh = sharding.make_mesh()
  model, _, step = _build(config, mesh)
  return config, mesh, model, step


def _images(seed, n=16, size=8):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, size=(n, size, size, 1)).astype(np.float32)


def _build(config, mesh, donate=True):
  ops = run_setup.build_ops(config, mesh)
  model = run_setup.build_model(config, ops)
  step = run_setup.build_train_step(config, mesh, ops, donate=donate)
  return model, run_setup.build_schedule(config), step


def _run(config, mesh, step, num_steps=2):
  state = run_setup.init_train_state(config, mesh)
  all_metrics = []
  for i in range(num_steps):
    images = jax.device_put(_images(i), sharding.batch_sharding(mesh))
    state, metrics = step(state, images)
    all_metrics.append(jax.device_get(metrics))
  return jax.device_get(state), all_metrics


def test_eight_devices_equal_one_device(built8):
  """The policy at auto, dropout 0.1: the same update on 1 and on 8 devices."""
  assert jax.device_count() == 8
  config, mesh8, model8, step8 = built8
  assert config.model.kernels == "auto" and config.model.dropout == 0.1
  mesh1 = sharding.make_mesh(jax.devices()[:1])
  model1, _, step1 = _build(config, mesh1)
  # On this CPU, auto is the CPU backend whatever the device count.
  assert model8.ops.name == model1.ops.name == "native"
  state8, m8 = _run(config, mesh8, step8)
  state1, m1 = _run(config, mesh1, step1)
  assert int(state8.step) == int(state1.step) == 2
  for a, b in zip(m8, m1):
    assert a["finite"] and b["finite"]
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  moved = 0.0
  for x8, x1, x0 in zip(jax.tree_util.tree_leaves(state8.params),
                        jax.tree_util.tree_leaves(state1.params),
                        jax.tree_util.tree_leaves(
                            jax.device_get(run_setup.init_train_state(
                                config, sharding.make_mesh(jax.devices()[:1])).params))):
    np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-6)
    moved = max(moved, float(np.max(np.abs(x1 - x0))))
  assert moved > 1e-4  # The second step (lr > 0 after the first warmup step) moved them.
  for tree in ("ema_params", "opt_state"):
    for x8, x1 in zip(jax.tree_util.tree_leaves(getattr(state8, tree)),
                      jax.tree_util.tree_leaves(getattr(state1, tree))):
      np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-7)


def test_debiased_ema_from_the_config():
  """optim.ema_debias reaches the compiled step: after the first update the EMA is the
  updated parameters (no share of the initialization), after the second the average of
  the two with weights 1 and decay (the float64 reference of `train_state`)."""
  config = training_testlib.digits_smoke()
  config.optim.ema_debias = True
  mesh = sharding.make_mesh(jax.devices()[:1])
  _, _, step = _build(config, mesh, donate=False)
  state = run_setup.init_train_state(config, mesh)
  decay = float(config.optim.ema_decay)
  history = []
  for i in range(2):
    state, _ = step(state, jax.device_put(_images(i), sharding.batch_sharding(mesh)))
    history.append(jax.device_get(state.params))
  for p1, p2, ema in zip(*(jax.tree_util.tree_leaves(t) for t in (*history,
                                                                  jax.device_get(
                                                                      state.ema_params)))):
    want = (decay * p1.astype(np.float64) + p2) / (1.0 + decay)
    np.testing.assert_allclose(ema, want, rtol=1e-5, atol=1e-6)


def _lowered_step_text(kernels):
  config = training_testlib.digits_smoke()
  config.model.kernels = kernels
  mesh = sharding.make_mesh()
  _, _, step = _build(config, mesh, donate=False)
  state = run_setup.abstract_train_state(config, mesh)
  images = jax.ShapeDtypeStruct((16, 8, 8, 1), jnp.float32,
                                sharding=sharding.batch_sharding(mesh))
  return step.lower(state, images).as_text()


def test_the_policy_decides_the_lowered_operations():
  """xla: pure JAX, no custom call at all; native (CPU): the compiled kernels' targets."""
  xla = _lowered_step_text("xla")
  assert "custom_call" not in xla and "convolution" in xla
  native = _lowered_step_text("native")
  for target in ("diffusion_jax_onednn_conv_forward", "diffusion_jax_onednn_conv_backward",
                 "diffusion_jax_group_norm_forward", "diffusion_jax_group_norm_backward",
                 "diffusion_jax_dropout"):
    assert f"@{target}" in native, target
  assert "stablehlo.convolution" not in native


def test_loss_matches_float64_reference_of_the_forward_process(built8):
  """The reported L_simple is mean ||eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t)||^2
  with each example's (t, eps) drawn from its own key, recomputed here in float64."""
  config, mesh, model, step = built8
  state = run_setup.init_train_state(config, mesh)
  params = jax.device_get(state.params)  # The step donates `state`.
  images = _images(7)
  _, metrics = step(state, jax.device_put(images, sharding.batch_sharding(mesh)))

  T = config.diffusion.num_timesteps
  betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
  abar = np.cumprod(1.0 - betas)
  step_key = jax.random.fold_in(streams.stream_key(config.seed, streams.TRAIN), 0)
  keys = train_step_lib.example_keys(step_key, 16)
  t, noise = train_step_lib.sample_t_and_noise(keys, T, images.shape[1:])
  t, noise = np.asarray(t), np.asarray(noise, np.float64)
  assert t.min() >= 0 and t.max() < T and len(set(t.tolist())) > 4
  x_t = (np.sqrt(abar[t])[:, None, None, None] * images +
         np.sqrt(1 - abar[t])[:, None, None, None] * noise)
  # train=True with the step's dropout key: the same dropout mask as the step used.
  dropout_key = jax.random.fold_in(step_key, 1)
  apply = jax.jit(lambda p, x, tt: model.apply({"params": p}, x, tt, train=True,
                                               rngs={"dropout": dropout_key}))
  eps_hat = np.asarray(apply(params, jnp.asarray(x_t, jnp.float32), jnp.asarray(t)),
                       np.float64)
  want = np.mean((noise - eps_hat) ** 2)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=2e-5)
  # The key of example b depends only on (step, b): a batch of 4 draws the same first 4.
  t4, noise4 = train_step_lib.sample_t_and_noise(
      train_step_lib.example_keys(step_key, 4), T, images.shape[1:])
  np.testing.assert_array_equal(np.asarray(t4), t[:4])
  np.testing.assert_array_equal(np.asarray(noise4), noise[:4].astype(np.float32))


def test_non_finite_step_leaves_state_unchanged(built8):
  config, mesh, _, step = built8
  state = run_setup.init_train_state(config, mesh)
  state, metrics = step(state, jax.device_put(_images(0), sharding.batch_sharding(mesh)))
  assert bool(metrics["finite"])
  before = jax.device_get(state)
  bad = _images(1)
  bad[3, 2, 2, 0] = np.nan
  state, metrics = step(state, jax.device_put(bad, sharding.batch_sharding(mesh)))
  assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) == 1
  for x, y in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(x, y)


def _copied_entry_parameters(hlo: str) -> int:
  """How many copy instructions of the optimized module read an argument of the program."""
  entry = hlo[hlo.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  params = set(re.findall(r"%([\w.\-]+) = \S+ parameter\(", entry))
  return sum(1 for operand in re.findall(r" copy\(%([\w.\-]+)\)", hlo) if operand in params)


def test_donated_step_updates_the_state_in_place_without_copies(built8):
  """The guarded update writes each leaf once: XLA copies no state leaf before updating.

  (With `where(finite, new, old)` over the tree XLA copied every parameter, moment and EMA
  leaf first, which doubled the update's time on the CIFAR10 network.)
  """
  config, mesh, _, step = built8
  state = run_setup.init_train_state(config, mesh)
  images = jax.device_put(_images(0), sharding.batch_sharding(mesh))
  # (At most a scalar or two, e.g. the step counter, of the 3 x leaves + 1 arrays.)
  assert _copied_entry_parameters(step.lower(state, images).compile().as_text()) <= 2
  # The check can fail: the same update written as a select over the tree copies it.
  tx = run_setup.build_optimizer(config)

  def select_update(state, grads):
    finite = jnp.isfinite(sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads)))
    new = train_state_lib.apply_gradients(state, grads, tx, 0.9999)
    return jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, state)

  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  select_hlo = jax.jit(select_update, donate_argnums=(0,)).lower(state, grads).compile()
  leaves = len(jax.tree_util.tree_leaves(state.params))
  assert _copied_entry_parameters(select_hlo.as_text()) >= leaves


def test_class_conditional_step_uses_the_labels_and_drops_them_at_the_rate():
  """A conditional network (digits, 10 classes + the null class 10): the update trains
  exactly the class-embedding rows of the labels it saw (3, and the null class through
  label dropout), and is the same on 1 and 8 devices."""
  config = training_testlib.digits_smoke("--config.model.num_classes=10",
                                         "--config.training.label_dropout=0.5")
  labels = jnp.full((16,), 3, jnp.int32)
  states = {}
  for name, mesh in (("8", sharding.make_mesh()), ("1", sharding.make_mesh(jax.devices()[:1]))):
    _, _, step = _build(config, mesh)
    state = run_setup.init_train_state(config, mesh)
    before = np.asarray(jax.device_get(state.params["class_embed"]))
    for i in range(2):  # the first update has learning rate 0 (warmup)
      state, metrics = step(state, jax.device_put(_images(i), sharding.batch_sharding(mesh)),
                            jax.device_put(labels, sharding.batch_sharding(mesh)))
      assert bool(jax.device_get(metrics)["finite"])
    states[name] = jax.device_get(state)
  after = np.asarray(states["8"].params["class_embed"])
  changed = np.flatnonzero(np.any(after != before, axis=1))
  np.testing.assert_array_equal(changed, [3, 10])
  for x8, x1 in zip(jax.tree_util.tree_leaves(states["8"].params),
                    jax.tree_util.tree_leaves(states["1"].params)):
    np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-6)
  keys = train_step_lib.example_keys(jax.random.key(0), 20_000)
  dropped = train_step_lib.drop_labels(keys, jnp.zeros(20_000, jnp.int32), 0.2, 10)
  assert set(np.unique(np.asarray(dropped))) == {0, 10}
  assert abs(float(np.mean(np.asarray(dropped) == 10)) - 0.2) < 0.02
  np.testing.assert_array_equal(
      dropped, train_step_lib.drop_labels(keys, jnp.zeros(20_000, jnp.int32), 0.2, 10))
