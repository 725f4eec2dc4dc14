"""Experiment configs: the paper's hyperparameters, smoke variants, Table 2 by overrides."""

import functools
import importlib.util
import os

import jax
import numpy as np
import pytest

from diffusion_jax import models
from diffusion_jax.training import optimizer
from diffusion_jax.training import run_setup
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax import validation
from diffusion_jax.training import train_step as train_step_lib
import training_testlib

CONFIGS = ("cifar10", "celebahq256", "lsun_church256", "lsun_bedroom256", "lsun_cat256",
           "mnist", "digits")


def _module(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(training_testlib.REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_and_its_smoke_variant_validate(name):
  mesh = sharding.make_mesh()
  for variant in ("", ":smoke"):
    config = training_testlib.load_config(f"configs/{name}.py{variant}")
    validation.validate_config(config, mesh)
  smoke = training_testlib.load_config(f"configs/{name}.py:smoke")
  assert smoke.training.num_train_steps <= 10 and smoke.training.batch_size <= 16
  assert models.count_params(models.unet_config_from(smoke)) < 1_000_000
  with pytest.raises(ValueError, match="variant"):
    _module(name).get_config("huge")


def test_paper_hyperparameters():
  c = training_testlib.load_config("configs/cifar10.py")
  assert (c.data.dataset, c.data.image_size, c.data.random_flip) == ("cifar10", 32, True)
  assert (c.model.ch, tuple(c.model.ch_mult), c.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
  assert tuple(c.model.attn_resolutions) == (16,) and c.model.dropout == 0.1
  assert (c.diffusion.num_timesteps, c.diffusion.beta_start, c.diffusion.beta_end) == (
      1000, 1e-4, 0.02)
  assert (c.diffusion.model_mean_type, c.diffusion.model_var_type, c.diffusion.loss_type) == (
      "eps", "fixedlarge", "mse")
  assert (c.training.batch_size, c.training.num_train_steps) == (128, 800_000)
  o = c.optim
  assert (o.learning_rate, o.warmup_steps, o.grad_clip_norm, o.ema_decay) == (
      2e-4, 5000, 1.0, 0.9999)
  assert (o.beta1, o.beta2, o.eps) == (0.9, 0.999, 1e-8)
  assert models.count_params(models.unet_config_from(c)) == 35_746_307
  steps = {"celebahq256": 500_000, "lsun_church256": 1_200_000,
           "lsun_bedroom256": 2_400_000, "lsun_cat256": 1_800_000}
  for name, num_steps in steps.items():
    c = training_testlib.load_config(f"configs/{name}.py")
    assert (c.data.image_size, c.training.batch_size, c.optim.learning_rate) == (256, 64, 2e-5)
    assert c.model.dropout == 0.0 and c.training.num_train_steps == num_steps
    assert c.data.random_flip == (name != "lsun_bedroom256")  # No flips on bedrooms.
  assert models.count_params(models.unet_config_from(c)) == 113_673_219


def test_command_line_overrides_reach_any_field():
  c = training_testlib.load_config(
      "configs/cifar10.py", "--config.training.batch_size=64",
      "--config.model.ch_mult=(1, 2)", "--config.diffusion.model_mean_type=v",
      "--config.optim.ema_decay=0.999")
  assert c.training.batch_size == 64 and tuple(c.model.ch_mult) == (1, 2)
  assert c.diffusion.model_mean_type == "v" and c.optim.ema_decay == 0.999
  with pytest.raises(Exception, match="not_a_field|Unknown"):
    training_testlib.load_config("configs/cifar10.py", "--config.training.not_a_field=1")


def test_bad_values_are_named_before_anything_runs():
  mesh = sharding.make_mesh()
  cases = {"--config.training.batch_size=12": "multiple of the 8 devices",
           "--config.diffusion.loss_type=l1": "loss_type",
           "--config.diffusion.model_mean_type=score": "mean",
           "--config.diffusion.beta_schedule=cubic": "beta schedule",
           "--config.sampling.sampler=unipc": "sampling.sampler",
           "--config.training.checkpoint_every_steps=0": "checkpoint_every_steps",
           "--config.model.num_groups=7": "num_groups|group"}
  for override, message in cases.items():
    with pytest.raises(ValueError, match=message):
      validation.validate_config(training_testlib.load_config("configs/cifar10.py", override),
                                mesh)


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
  training_testlib.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  yield
  training_testlib.disable_compilation_cache()


def test_table2_rows_are_overrides_and_the_stable_ones_train(_cache):
  rows = _module("cifar10").TABLE2_ROWS
  assert len(rows) == 6
  default = training_testlib.load_config("configs/cifar10.py")
  mesh = sharding.make_mesh(jax.devices()[:1])
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32)
  trained = []
  for name, (overrides, reported) in rows.items():
    config = training_testlib.load_config("configs/cifar10.py", *overrides)
    validation.validate_config(config, mesh)
    d = config.diffusion
    if "L_simple" in name:  # The default of cifar10.py, which every training test runs.
      assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
          default.diffusion.model_mean_type, default.diffusion.model_var_type,
          default.diffusion.loss_type)
      continue
    if reported == "unstable":
      continue
    # One step of a tiny network on 8x8 images with this row's objective.
    tiny = training_testlib.load_config(
        "configs/cifar10.py:smoke", *overrides, "--config.data.image_size=8",
        "--config.model.ch_mult=(1,)", "--config.model.attn_resolutions=()",
        "--config.training.batch_size=8", "--config.optim.warmup_steps=0")
    model = run_setup.build_model(tiny)
    step = train_step_lib.make_train_step(
        train_step_lib.make_loss_fn(model, run_setup.build_schedule(tiny), tiny.diffusion),
        run_setup.build_optimizer(tiny), num_timesteps=tiny.diffusion.num_timesteps,
        ema_decay=tiny.optim.ema_decay,
        base_key=streams.stream_key(tiny.seed, streams.TRAIN), mesh=mesh,
        learning_rate_fn=functools.partial(optimizer.current_learning_rate, tiny.optim))
    state = run_setup.init_train_state(tiny, mesh)
    before = jax.device_get(state.params)
    state, metrics = step(state, jax.device_put(images, sharding.batch_sharding(mesh)))
    metrics = jax.device_get(metrics)
    assert bool(metrics["finite"]) and np.isfinite(metrics["loss"]), name
    assert metrics["loss"] > 0 and metrics["grad_norm"] > 0
    if d.loss_type == "kl":  # The loss is the bound term itself.
      np.testing.assert_allclose(metrics["loss"], metrics["vb"], rtol=1e-6)
    out = models.unet_config_from(tiny).out_channels
    assert out == (6 if d.model_var_type == "learned" else 3)
    assert int(state.step) == 1 and any(
        not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                 jax.tree_util.tree_leaves(state.params)))
    trained.append(name)
  assert len(trained) == 3
