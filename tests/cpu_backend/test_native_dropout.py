"""The CPU backend's dropout kernel (`backends/cpu/dropout.py`) against a NumPy Philox.

The reference generator is `kernel_references.philox4x32_10`, Philox4x32-10 written in
NumPy from Salmon et al. (2011), checked here on the known-answer vector of the authors'
Random123 library; the kernel's masks must equal the reference's bit for bit (element i
kept iff word i of the stream is below keep * 2^32), for sizes that are not multiples of
four or of the threads' share, and its gradient must apply the same mask. Shards of a
larger array (the `shard` operand) and the runs over 8 devices are test_per_shard.py's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_references import one_device_mesh
from kernel_references import philox4x32_10
from kernel_references import reference_mask

from diffusion_jax import ops
from diffusion_jax.backends import cpu
from diffusion_jax.backends.cpu import dropout
from diffusion_jax.models import layers

pytestmark = pytest.mark.native

TARGET = "diffusion_jax_dropout"


def test_reference_philox_matches_the_random123_known_answer():
  # Random123's kat_vectors: philox4x32 10 rounds, counter 0, key 0.
  got = philox4x32_10(np.zeros((1, 4), np.uint32), (0, 0))[0]
  assert [hex(v) for v in got] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


@pytest.mark.parametrize("shape", [(7,), (3, 5, 7, 2), (2, 64, 64, 33), (3, 61, 61, 11)])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_mask_and_gradient_match_the_reference(shape, rate):
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  key = jax.random.key(sum(shape))
  words = np.asarray(dropout.key_words(key))
  keep = 1.0 - rate
  mask = reference_mask(x.size, words, keep).reshape(shape)
  y, vjp = jax.jit(lambda x: jax.vjp(lambda a: dropout.dropout(a, key, rate), x))(x)
  (dx,) = jax.jit(vjp)(g)
  np.testing.assert_array_equal(np.asarray(y), np.where(mask, x / np.float32(keep), 0))
  np.testing.assert_array_equal(np.asarray(dx), np.where(mask, g / np.float32(keep), 0))
  if x.size > 10000:  # the kept fraction is keep, to within 5 standard errors
    assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * rate / x.size)


def test_rate_zero_is_the_identity():
  x = jnp.arange(6.0)
  assert dropout.dropout(x, jax.random.key(0), 0.0) is x


def test_network_dropout_uses_the_kernel_and_draws_from_its_stream():
  x = jnp.ones((2, 8, 8, 16))
  key = jax.random.key(3)
  native = cpu.make_ops(one_device_mesh())
  outs = {}
  for backend in (native, ops.XLA):
    layer = layers.Dropout(0.1, deterministic=False, ops=backend)
    f = lambda x, k, layer=layer: layer.apply({}, x, rngs={"dropout": k})
    outs[backend.name] = np.asarray(jax.jit(f)(x, key))
    hlo = jax.jit(f).lower(x, key).as_text()
    assert (TARGET in hlo) == (backend.name == "native")
  for out in outs.values():
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1.0 / 0.9, rtol=1e-7)
    assert 0.8 < kept.mean() < 0.97
  layer = layers.Dropout(0.1, deterministic=False, ops=native)
  apply = lambda x, k: layer.apply({}, x, rngs={"dropout": k})
  again = np.asarray(jax.jit(apply)(x, key))
  other = np.asarray(jax.jit(apply)(x, jax.random.key(4)))
  np.testing.assert_array_equal(again, outs["native"])  # deterministic in the key
  assert np.any(other != outs["native"])
  # The backend's dropout is the kernel's stream, drawn with the key it is given.
  got = np.asarray(jax.jit(lambda x, k: native.dropout(x, k, 0.1))(x, key))
  mask = reference_mask(x.size, np.asarray(dropout.key_words(key)), 0.9).reshape(x.shape)
  np.testing.assert_array_equal(got, np.where(mask, np.float32(1.0) / np.float32(0.9), 0))


def test_bfloat16_takes_the_reference_and_bad_input_is_named():
  native = cpu.make_ops(one_device_mesh())
  x = jnp.ones((4, 8), jnp.bfloat16)
  hlo = jax.jit(lambda x, k: native.dropout(x, k, 0.1)).lower(x, jax.random.key(0)).as_text()
  assert TARGET not in hlo
  with pytest.raises(ValueError, match="float32"):
    dropout.dropout(jnp.zeros(4, jnp.bfloat16), jax.random.key(0), 0.1)
  with pytest.raises(ValueError, match="rate"):
    dropout.dropout(jnp.zeros(4), jax.random.key(0), 1.0)
  with pytest.raises(ValueError, match="rate"):
    native.dropout(jnp.zeros(4), jax.random.key(0), -0.1)
