"""The U-Net alone: parameter counts, official initialization, layers against TF's own ops
and float64 NumPy, mixed precision, dropout and input checks.

Whole-network parity with diffusers' UNet2DModel is in test_unet_parity.py.
"""

import dataclasses
import math

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from unet_fixtures import apply_eval
from unet_fixtures import load_config
from unet_fixtures import random_params
from unet_fixtures import SMALL

from diffusion_jax import models
from diffusion_jax.models import layers
from diffusion_jax.models import UNet
from diffusion_jax.models import UNetConfig


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- Configs and parameter counts -------------------------------------------------------


def test_parameter_counts_of_the_paper_models():
  # The paper's counts (REFERENCE.md), from jax.eval_shape: nothing is compiled.
  assert models.count_params(models.unet_config_from(load_config("cifar10.py"))) == 35_746_307
  # The LSUN configs have the same network (test_convert checks their architecture).
  assert models.count_params(models.unet_config_from(load_config("celebahq256.py"))) == (
      113_673_219)


def test_learned_variances_double_the_output_channels():
  config = load_config("cifar10.py")
  base = models.unet_config_from(config)
  for var_type, out in (("fixedlarge", 3), ("fixedsmall", 3), ("learned", 6),
                        ("learned_range", 6)):
    config.diffusion.model_var_type = var_type
    assert models.unet_config_from(config).out_channels == out
  # Only conv_out grows: 3x3x128 weights and one bias per extra channel.
  assert (models.count_params(models.unet_config_from(config))
          == models.count_params(base) + 3 * (3 * 3 * 128 + 1))


def test_config_from_experiment_config():
  c = models.unet_config_from(load_config("mnist.py"))
  assert (c.ch, c.ch_mult, c.num_res_blocks, c.attn_resolutions, c.in_channels,
          c.out_channels, c.image_size, c.dropout, c.num_groups, c.dtype) == (
              64, (1, 2, 2), 2, (14,), 1, 1, 28, 0.1, 32, "float32")
  assert c.resolutions == (28, 14, 7)
  hash(c)  # Frozen and hashable: usable as a static argument.


@pytest.mark.parametrize("change, message", [
    (dict(image_size=30), "divisible by"),
    (dict(attn_resolutions=(12,)), "match no level"),
    (dict(num_groups=24), "num_groups=24"),
    (dict(dtype="float16"), "dtype"),
    (dict(dropout=1.0), "dropout"),
    (dict(ch_mult=()), "ch_mult"),
])
def test_invalid_configs_are_rejected_with_the_reason(change, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(SMALL, **change)


def test_input_shape_is_checked_before_compiling():
  params = models.param_shapes(SMALL)
  model = UNet(SMALL)
  with pytest.raises(ValueError, match=r"\[B, 16, 16, 3\]"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 1)),
                                         jnp.zeros((2,), jnp.int32)), params)
  with pytest.raises(ValueError, match="one per example"):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 3)),
                                         jnp.zeros((3,), jnp.int32)), params)


# --- Official initialization ------------------------------------------------------------

NEAR_ZERO = ("conv2", "proj_out", "conv_out")


def test_official_initialization():
  config = UNetConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                      num_groups=16, image_size=16)
  params = models.init_params(config, jax.random.key(0))
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}
  assert all(v.dtype == np.float32 for v in flat.values())
  kernels = 0
  for name, value in flat.items():
    module, leaf = name.split("/")[-2:]
    if leaf == "bias":
      np.testing.assert_array_equal(value, 0.0, err_msg=name)
    elif leaf == "scale":
      np.testing.assert_array_equal(value, 1.0, err_msg=name)
    else:
      # TF variance_scaling(fan_avg, uniform): U(+-sqrt(3 s / fan_avg)), where fan_in and
      # fan_out are the in/out channels times the receptive field (3x3 for convs).
      receptive = int(np.prod(value.shape[:-2]))
      fan_avg = receptive * (value.shape[-2] + value.shape[-1]) / 2
      scale = 1e-10 if module in NEAR_ZERO else 1.0
      limit = math.sqrt(3 * scale / fan_avg)
      assert np.abs(value).max() <= limit * (1 + 1e-6), name
      # The variance of U(-a, a) is a^2 / 3; checked where there are enough draws.
      if value.size >= 4096:
        assert abs(value.var() / (limit**2 / 3) - 1) < 0.1, name
        assert abs(value.mean()) < 0.05 * limit, name
      kernels += 1
  assert {n.split("/")[-2] for n in flat if n.split("/")[-2] in NEAR_ZERO} == set(NEAR_ZERO)
  assert kernels == sum(1 for n in flat if n.endswith("kernel"))
  # A different key gives different weights; the same key the same ones.
  again = models.init_params(config, jax.random.key(0))
  other = models.init_params(config, jax.random.key(1))
  assert np.array_equal(again["conv_in"]["kernel"], params["conv_in"]["kernel"])
  assert not np.array_equal(other["conv_in"]["kernel"], params["conv_in"]["kernel"])


# --- Layers against independent references ------------------------------------------------


def test_timestep_embedding_matches_the_official_formula_in_float64():
  t = np.array([0, 1, 2, 17, 500, 998, 999])
  for dim in (128, 33):
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(math.log(10000) / (half - 1)))
    args = t[:, None].astype(np.float64) * freqs[None]
    want = np.concatenate([np.sin(args), np.cos(args)], axis=1)  # sin first, then cos
    if dim % 2:
      want = np.pad(want, ((0, 0), (0, 1)))
    got = np.asarray(layers.timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert got.shape == (len(t), dim) and got.dtype == np.float32
    # float32 rounding of t * f (t < 1000) bounds the phase error by ~1000 * 6e-8.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[:4], want[:4], rtol=0, atol=2e-6)


def test_group_norm_matches_float64_numpy():
  rng = np.random.default_rng(0)
  x = (5.0 + 3.0 * rng.standard_normal((2, 4, 4, 12))).astype(np.float32)
  scale, bias = rng.standard_normal(12), rng.standard_normal(12)
  got = layers.GroupNorm(num_groups=3).apply(
      {"params": {"scale": jnp.asarray(scale, jnp.float32),
                  "bias": jnp.asarray(bias, jnp.float32)}}, x)
  g = x.astype(np.float64).reshape(2, 4, 4, 3, 4)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  want = ((g - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_resampling_matches_tensorflow_ops():
  """The official code's own TF ops: conv2d SAME stride 2, avg_pool SAME, resize NEAREST."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  w = (rng.standard_normal((3, 3, 4, 4)) / 6).astype(np.float32)
  b = rng.standard_normal(4).astype(np.float32)
  conv = {"params": {"conv": {"kernel": w, "bias": b}}}

  down = layers.Downsample(with_conv=True).apply(conv, x)
  want = tf.nn.conv2d(x, w, strides=2, padding="SAME") + b
  np.testing.assert_allclose(np.asarray(down), want.numpy(), rtol=0, atol=1e-5)
  # SAME with stride 2 on an even size pads one row/column at the bottom/right only.
  padded = np.pad(x.astype(np.float64), ((0, 0), (0, 1), (0, 1), (0, 0)))
  manual = sum(np.einsum("bhwi,io->bhwo", padded[:, i:i + 8:2, j:j + 8:2], w[i, j])
               for i in range(3) for j in range(3)) + b
  np.testing.assert_allclose(np.asarray(down), manual, rtol=0, atol=1e-5)

  pooled = layers.Downsample(with_conv=False).apply({}, x)
  np.testing.assert_allclose(np.asarray(pooled),
                             tf.nn.avg_pool(x, 2, 2, "SAME").numpy(), rtol=0, atol=1e-6)

  resized = tf.compat.v1.image.resize(
      x, [16, 16], method=tf.image.ResizeMethod.NEAREST_NEIGHBOR, align_corners=True)
  np.testing.assert_array_equal(np.asarray(layers.Upsample(with_conv=False).apply({}, x)),
                                resized.numpy())
  up = layers.Upsample(with_conv=True).apply(conv, x)
  want = tf.nn.conv2d(resized, w, strides=1, padding="SAME") + b
  np.testing.assert_allclose(np.asarray(up), want.numpy(), rtol=0, atol=1e-5)


# --- Mixed precision and dropout ------------------------------------------------------------


def test_bfloat16_compute_is_close_to_float32():
  params = random_params(SMALL, seed=0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([3, 870], jnp.int32)
  f32 = apply_eval(SMALL, params, x, t)
  bf16_config = dataclasses.replace(SMALL, dtype="bfloat16")
  bf16 = apply_eval(bf16_config, params, x, t)
  apply_bf16 = lambda p, x, t: UNet(bf16_config).apply({"params": p}, x, t)
  assert bf16.dtype == jnp.float32  # The output is float32 whatever the compute dtype.
  err = rel_err(bf16, f32)
  assert err < 2e-2
  assert err > 1e-5  # The computation really ran in bfloat16.
  # Convs and matmuls take bfloat16 inputs; every exp (softmax, embedding) is float32.
  jaxpr = jax.make_jaxpr(apply_bf16)(params, x, t)
  eqns = [e for e in jaxpr.jaxpr.eqns]
  inner = []
  while eqns:
    e = eqns.pop()
    inner.append(e)
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if hasattr(sub, "jaxpr"):
          eqns.extend(getattr(sub.jaxpr, "eqns", getattr(sub, "eqns", [])))
  convs = [e for e in inner if e.primitive.name == "conv_general_dilated"]
  exps = [e for e in inner if e.primitive.name == "exp"]
  assert convs and all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)
  # GroupNorm statistics: every rsqrt (1 / std) is float32.
  rsqrts = [e for e in inner if e.primitive.name == "rsqrt"]
  assert rsqrts and all(e.invars[0].aval.dtype == jnp.float32 for e in rsqrts)


def test_dropout_only_in_train_mode_from_the_dropout_stream():
  config = UNetConfig(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                      num_groups=4, image_size=8, dropout=0.3)
  params = random_params(config, seed=1)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
  t = jnp.asarray([10, 20], jnp.int32)

  @jax.jit
  def run(key):
    return UNet(config).apply({"params": params}, x, t, train=True, rngs={"dropout": key})

  a = run(jax.random.key(0))
  b = run(jax.random.key(0))
  c = run(jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert rel_err(a, c) > 1e-3
  no_dropout = dataclasses.replace(config, dropout=0.0)
  eval_out, train_no_dropout = jax.jit(lambda p: (
      UNet(config).apply({"params": p}, x, t, train=False),
      UNet(no_dropout).apply({"params": p}, x, t, train=True)))(params)
  np.testing.assert_allclose(eval_out, train_no_dropout, rtol=0, atol=0)
  assert rel_err(a, eval_out) > 1e-3


# --- Rematerialization ----------------------------------------------------------------------


def _train_loss_and_grads(config, params, x, t, key):
  def loss(p):
    out = UNet(config).apply({"params": p}, x, t, train=True, rngs={"dropout": key})
    return jnp.mean(out ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_keeps_parameters_values_and_gradients():
  config = dataclasses.replace(SMALL, dropout=0.2)  # Dropout must replay in the recompute.
  remat = dataclasses.replace(config, remat=True)
  params = random_params(config, seed=3)
  # Same parameter tree (checkpoints and imported weights load either way).
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
  t = jnp.asarray([5, 900], jnp.int32)
  init = lambda c: jax.eval_shape(lambda: UNet(c).init(jax.random.key(0), x, t)["params"])
  assert jax.tree.map(lambda a: (a.shape, a.dtype), init(remat)) == jax.tree.map(
      lambda a: (a.shape, a.dtype), init(config))
  key = jax.random.key(7)
  loss, grads = _train_loss_and_grads(config, params, x, t, key)
  loss_r, grads_r = _train_loss_and_grads(remat, params, x, t, key)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  flat, flat_r = (flax.traverse_util.flatten_dict(g) for g in (grads, grads_r))
  assert flat.keys() == flat_r.keys()
  for name in flat:
    np.testing.assert_allclose(flat_r[name], flat[name], rtol=2e-4, atol=1e-6,
                               err_msg="/".join(name))
  # Dropout really acted (else the replay would be untested).
  loss_other, _ = _train_loss_and_grads(remat, params, x, t, jax.random.key(8))
  assert abs(float(loss_other) - float(loss)) > 1e-6 * abs(float(loss))


def _primitive_count(jaxpr, name: str) -> int:
  """Equations named `name` in `jaxpr` and every jaxpr nested in it."""
  count, stack = 0, list(jaxpr.eqns)
  while stack:
    e = stack.pop()
    count += e.primitive.name == name
    for p in e.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(sub, "jaxpr", sub)
        stack.extend(getattr(inner, "eqns", []))
  return count


def test_remat_wraps_every_res_and_attention_block():
  # ch_mult (1, 2) with attention at 16x16: res blocks 2 + 2 (down), 2 (middle), 3 + 3
  # (up) = 12; attention blocks 2 (down), 1 (middle), 3 (up) = 6.
  config = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(16,),
                      dropout=0.1, num_groups=8, image_size=32)
  params = models.param_shapes(config)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)

  def jaxpr(c):
    def loss(p, x, t):
      return jnp.mean(UNet(c).apply({"params": p}, x, t, train=True,
                                    rngs={"dropout": jax.random.key(0)}) ** 2)
    return jax.make_jaxpr(jax.grad(loss))(params, x, t).jaxpr

  # The name JAX gives the primitive of `jax.checkpoint` (what `nn.remat` emits).
  remat = jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).jaxpr.eqns[0].primitive.name
  assert _primitive_count(jaxpr(config), remat) == 0
  assert _primitive_count(jaxpr(dataclasses.replace(config, remat=True)), remat) == 12 + 6
