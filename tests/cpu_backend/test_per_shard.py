"""The CPU kernels run per device shard (`backends/cpu/per_shard.py`): 8 devices give what
one device gives.

The backend's operations over the session's 8 fake CPU devices (`make_ops(mesh8)`: each
kernel under `jax.shard_map`, each device on its rows of the batch, the replicated
operands' gradients summed over the devices) against the same operations over one device
(each kernel called directly) and the float64 references of `kernel_references`: values
and every gradient within float32 rounding (the sums over the batch are added in another
order; the 3x3 convolutions may pick another algorithm for the smaller per-device batch),
dropout masks bit for bit (element i of shard s is global element s * size + i). Batches
that divide by 8 and batches that do not (padded with zero rows to 8, the padding
dropped) both.
"""

import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_references import eight_device_mesh
from kernel_references import group_norm_values_and_grads
from kernel_references import numpy_conv_and_grads
from kernel_references import one_device_mesh
from kernel_references import reference_mask
from kernel_references import rel

from diffusion_jax import sharding
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import dropout

pytestmark = pytest.mark.native

EPS = 1e-6
TARGETS = ("diffusion_jax_onednn_conv_forward", "diffusion_jax_onednn_conv_backward",
           "diffusion_jax_group_norm_forward", "diffusion_jax_group_norm_backward",
           "diffusion_jax_dropout")


def _conv3x3_case(batch, stride, rng):
  x = rng.standard_normal((batch, 9, 7, 16)).astype(np.float32)
  w = (rng.standard_normal((3, 3, 16, 24)) / 12.0).astype(np.float32)
  b = rng.standard_normal(24).astype(np.float32)
  g = rng.standard_normal((batch, -(-9 // stride), -(-7 // stride), 24)).astype(np.float32)
  y, dx, dw = numpy_conv_and_grads(x, w, g, stride)
  want = (y + b, dx, dw, np.asarray(g, np.float64).sum(axis=(0, 1, 2)))
  return lambda o: lambda x, w, b: o.conv3x3(x, w, stride, b), (x, w, b), g, want


def _conv1x1_case(batch, rng):
  x = rng.standard_normal((batch, 4, 5, 12)).astype(np.float32)
  w = rng.standard_normal((12, 20)).astype(np.float32)
  b = rng.standard_normal(20).astype(np.float32)
  g = rng.standard_normal((batch, 4, 5, 20)).astype(np.float32)
  x64, w64, g64 = (np.asarray(a, np.float64) for a in (x, w, g))
  want = (x64 @ w64 + b, g64 @ w64.T, np.einsum("bhwc,bhwo->co", x64, g64),
          g64.sum(axis=(0, 1, 2)))
  return lambda o: o.conv1x1, (x, w, b), g, want


def _group_norm_case(batch, rng):
  x = (3.0 + 2.0 * rng.standard_normal((batch, 6, 5, 16))).astype(np.float32)
  scale = (1.0 + 0.3 * rng.standard_normal(16)).astype(np.float32)
  bias = (0.3 * rng.standard_normal(16)).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  want = group_norm_values_and_grads(x, scale, bias, g, 4, True, EPS)
  op = lambda o: lambda x, s, b: o.group_norm(x, s, b, num_groups=4, epsilon=EPS,
                                              swish=True)
  return op, (x, scale, bias), g, want


def _case(name, batch):
  rng = np.random.default_rng(batch * 10 + len(name))
  if name == "conv3x3":
    return _conv3x3_case(batch, 1, rng)
  if name == "conv3x3_stride2":
    return _conv3x3_case(batch, 2, rng)
  if name == "conv1x1":
    return _conv1x1_case(batch, rng)
  return _group_norm_case(batch, rng)


def _values_and_grads(op, args, g, mesh):
  """(y, d arg for each arg) of op under jax.jit, the batch (args[0] and g) split over
  `mesh` where it divides."""
  if args[0].shape[0] % mesh.devices.size == 0:
    rows = sharding.batch_sharding(mesh)
    args = (jax.device_put(args[0], rows),) + tuple(
        jax.device_put(a, sharding.replicated(mesh)) for a in args[1:])
    g = jax.device_put(g, rows)
  loss = lambda *a: jnp.vdot(op(*a[:-1]), a[-1])
  f = lambda *a: (op(*a[:-1]), *jax.grad(loss, argnums=tuple(range(len(a) - 1)))(*a))
  return jax.jit(f)(*args, g)


@pytest.mark.parametrize("batch", [8, 5])
@pytest.mark.parametrize("name", ["conv3x3", "conv3x3_stride2", "conv1x1", "group_norm"])
def test_values_and_all_gradients_on_8_devices_equal_one_device(name, batch):
  op, args, g, want = _case(name, batch)
  one = _values_and_grads(op(cpu.make_ops(one_device_mesh())), args, g, one_device_mesh())
  eight = _values_and_grads(op(cpu.make_ops(eight_device_mesh())), args, g,
                            eight_device_mesh())
  if batch % 8 == 0:  # the batch stays split: the result and input gradient too
    for a in (eight[0], eight[1]):
      assert a.sharding.is_equivalent_to(sharding.batch_sharding(eight_device_mesh()),
                                         a.ndim)
  for what, a, b, exact in zip(("y", "dx", "dparam", "dbias"), eight, one, want):
    assert a.dtype == b.dtype == jnp.float32 and a.shape == b.shape == exact.shape, what
    assert rel(a, b) < 1e-6, (what, rel(a, b))
    assert rel(a, exact) < 2e-6, (what, rel(a, exact))
    assert rel(b, exact) < 2e-6, (what, rel(b, exact))


def _dropout_and_grad(mesh, x, g, key, rate):
  ops = cpu.make_ops(mesh)
  if x.shape[0] % mesh.devices.size == 0:
    x, g = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in (x, g))
  f = lambda x, k: jnp.vdot(ops.dropout(x, k, rate), g)
  y, dx = jax.jit(lambda x, k: (ops.dropout(x, k, rate), jax.grad(f)(x, k)))(x, key)
  return np.asarray(y), np.asarray(dx)


@pytest.mark.parametrize("batch", [8, 5])
def test_dropout_on_8_devices_draws_the_one_device_mask_bit_for_bit(batch):
  # 75 elements per row: most devices' shards start inside a Philox block of 4 words.
  rng = np.random.default_rng(batch)
  x = rng.standard_normal((batch, 5, 5, 3)).astype(np.float32)
  g = rng.standard_normal(x.shape).astype(np.float32)
  key, rate = jax.random.key(batch), 0.3
  one = _dropout_and_grad(one_device_mesh(), x, g, key, rate)
  eight = _dropout_and_grad(eight_device_mesh(), x, g, key, rate)
  for a, b in zip(eight, one):
    np.testing.assert_array_equal(a, b)
  keep = np.float32(1.0 - rate)
  mask = reference_mask(x.size, np.asarray(dropout.key_words(key)), keep).reshape(x.shape)
  np.testing.assert_array_equal(eight[0], np.where(mask, x / keep, 0))
  np.testing.assert_array_equal(eight[1], np.where(mask, g / keep, 0))
  assert 0 < mask.mean() < 1


@pytest.mark.parametrize("shape,shard", [
    ((3, 5, 7), 1),                         # 105 elements: starts at word 1 of a block
    ((3, 5, 7), 2),                         # word 2
    ((3, 61, 61, 11), 3),                   # odd and large: several threads, misaligned
    ((4, 9, 9, 4), 5),                      # a multiple of 4: whole blocks, offset
    ((3, 5, 7), np.uint32(3_000_000_000)),  # global index beyond 2^32 (64-bit counter)
])
def test_a_shard_draws_the_words_of_its_global_positions(shape, shard):
  rng = np.random.default_rng(len(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  key, rate = jax.random.key(11), 0.5
  f = lambda x: dropout.dropout(x, key, rate, shard=shard)
  y, vjp = jax.jit(lambda x: jax.vjp(f, x))(x)
  (dx,) = jax.jit(vjp)(g)
  words = np.asarray(dropout.key_words(key))
  mask = reference_mask(x.size, words, 1.0 - rate, first=int(shard) * x.size)
  mask = mask.reshape(shape)
  np.testing.assert_array_equal(np.asarray(y), np.where(mask, x / np.float32(0.5), 0))
  np.testing.assert_array_equal(np.asarray(dx), np.where(mask, g / np.float32(0.5), 0))
  # Not the mask of shard 0: the offset is used.
  assert np.any(mask != reference_mask(x.size, words, 1.0 - rate).reshape(shape))


def _manual_regions(text: str) -> tuple[list[str], str]:
  """(the bodies of the program's shard_map regions, the text outside them)."""
  regions, outside, current, indent = [], [], None, None
  for line in text.splitlines():
    if current is None:
      if "sdy.manual_computation(" in line:
        current, indent = [line], len(line) - len(line.lstrip())
      else:
        outside.append(line)
    else:
      current.append(line)
      if len(line) - len(line.lstrip()) == indent and line.lstrip().startswith("}"):
        regions.append("\n".join(current))
        current = None
  assert current is None, "unterminated manual computation"
  return regions, "\n".join(outside)


def _training_like_step(ops):
  """A residual block's operations and its parameter gradients (x, kernel, scale, key)."""
  def loss(params, x, key):
    h = ops.group_norm(x, params["scale"], params["bias"], num_groups=4, epsilon=EPS,
                       swish=True)
    h = ops.dropout(h, key, 0.1)
    h = ops.conv3x3(h, params["kernel"], 1, params["conv_bias"])
    return jnp.mean(jnp.square(ops.conv1x1(h, params["nin"], params["conv_bias"])))
  return jax.jit(jax.grad(loss))


def _lowered_step(mesh) -> str:
  params = {"scale": jnp.ones(16), "bias": jnp.zeros(16), "kernel": jnp.ones((3, 3, 16, 16)),
            "conv_bias": jnp.zeros(16), "nin": jnp.ones((16, 16))}
  x = jax.ShapeDtypeStruct((8, 8, 8, 16), jnp.float32,
                           sharding=NamedSharding(mesh, P(sharding.DATA_AXIS)))
  return _training_like_step(cpu.make_ops(mesh)).lower(params, x, jax.random.key(0)).as_text()


def test_the_8_device_program_runs_the_kernels_inside_shard_map():
  text = _lowered_step(eight_device_mesh())
  regions, outside = _manual_regions(text)
  assert regions and all('manual_axes={"data"}' in r for r in regions)
  for target in TARGETS:  # every kernel, and only inside the shard_maps
    assert any(f"custom_call @{target}(" in r for r in regions), target
    assert target not in outside, target
  # The kernel gradients are summed over the devices inside the convolutions' backward
  # shard_map (an all-reduce over all 8), not gathered.
  backward = [r for r in regions if "diffusion_jax_onednn_conv_backward" in r]
  assert len(backward) == 2 and all("stablehlo.all_reduce" in r for r in backward)
  assert all(re.search(r"replica_groups = dense<\[\[0, 1, 2, 3, 4, 5, 6, 7\]\]>", r)
             for r in backward)
  assert "all_gather" not in text


def test_the_1_device_program_calls_the_kernels_directly():
  text = _lowered_step(one_device_mesh())
  assert "manual_computation" not in text and "all_reduce" not in text
  for target in TARGETS:
    assert f"custom_call @{target}(" in text, target
