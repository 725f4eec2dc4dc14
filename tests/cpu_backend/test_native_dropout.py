"""The compiled dropout kernel (`models/native_dropout.py`) against a NumPy Philox.

The reference generator is Philox4x32-10 written here in NumPy from Salmon et al. (2011),
checked on the known-answer vector of the authors' Random123 library; the kernel's masks
must equal the reference's bit for bit (element i kept iff word i of the stream is below
keep * 2^32), for sizes that are not multiples of four or of the threads' share, and its
gradient must apply the same mask. The session runs with 8 fake CPU devices, where the
kernel is off by default, so the tests ask for it with `conv.cpu_library("onednn")`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import conv
from diffusion_jax.models import layers
from diffusion_jax.models import native_dropout

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32_10(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
  """[n, 4] uint32 counters -> [n, 4] uint32 outputs (Salmon et al. 2011, Philox4x32-10)."""
  x = [counters[:, i].astype(np.uint64) for i in range(4)]
  k0, k1 = key
  for _ in range(10):
    p0 = np.uint64(M0) * x[0]
    p1 = np.uint64(M1) * x[2]
    x = [(p1 >> np.uint64(32)) ^ x[1] ^ np.uint64(k0), p1 & np.uint64(MASK32),
         (p0 >> np.uint64(32)) ^ x[3] ^ np.uint64(k1), p0 & np.uint64(MASK32)]
    k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
  return np.stack(x, axis=1).astype(np.uint32)


def test_reference_philox_matches_the_random123_known_answer():
  # Random123's kat_vectors: philox4x32 10 rounds, counter 0, key 0.
  got = philox4x32_10(np.zeros((1, 4), np.uint32), (0, 0))[0]
  assert [hex(v) for v in got] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]


def reference_mask(size: int, words, keep: float) -> np.ndarray:
  blocks = -(-size // 4)
  j = np.arange(blocks, dtype=np.uint64)
  counters = np.stack([j & np.uint64(MASK32), j >> np.uint64(32),
                       np.zeros_like(j), np.zeros_like(j)], axis=1).astype(np.uint32)
  stream = philox4x32_10(counters, (int(words[0]), int(words[1]))).reshape(-1)[:size]
  # The kernel's keep is float32 (its attribute): the threshold is float32(keep) 2^32.
  return stream < np.uint64(int(float(np.float32(keep)) * 2.0**32 + 0.5))


@pytest.mark.parametrize("shape", [(7,), (3, 5, 7, 2), (2, 64, 64, 33), (3, 61, 61, 11)])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_mask_and_gradient_match_the_reference(shape, rate):
  rng = np.random.default_rng(sum(shape))
  x = rng.standard_normal(shape).astype(np.float32)
  g = rng.standard_normal(shape).astype(np.float32)
  key = jax.random.key(sum(shape))
  words = np.asarray(native_dropout.key_words(key))
  keep = 1.0 - rate
  mask = reference_mask(x.size, words, keep).reshape(shape)
  y, vjp = jax.jit(lambda x: jax.vjp(lambda a: native_dropout.dropout(a, key, rate), x))(x)
  (dx,) = jax.jit(vjp)(g)
  np.testing.assert_array_equal(np.asarray(y), np.where(mask, x / np.float32(keep), 0))
  np.testing.assert_array_equal(np.asarray(dx), np.where(mask, g / np.float32(keep), 0))
  if x.size > 10000:  # the kept fraction is keep, to within 5 standard errors
    assert abs(mask.mean() - keep) < 5 * np.sqrt(keep * rate / x.size)


def test_network_dropout_uses_the_kernel_and_draws_from_its_stream():
  x = jnp.ones((2, 8, 8, 16))
  layer = layers.Dropout(0.1, deterministic=False)
  key = jax.random.key(3)
  outs = {}
  for library in ("onednn", "xla"):
    with conv.cpu_library(library):
      f = lambda x, k: layer.apply({}, x, rngs={"dropout": k})
      outs[library] = np.asarray(jax.jit(f)(x, key))
      hlo = jax.jit(f).lower(x, key).as_text()
    assert ("diffusion_jax_dropout" in hlo) == (library == "onednn")
  for out in outs.values():
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1.0 / 0.9, rtol=1e-7)
    assert 0.8 < kept.mean() < 0.97
  with conv.cpu_library("onednn"):
    again = np.asarray(jax.jit(lambda x, k: layer.apply({}, x, rngs={"dropout": k}))(x, key))
    other = np.asarray(jax.jit(lambda x, k: layer.apply({}, x, rngs={"dropout": k}))(
        x, jax.random.key(4)))
  np.testing.assert_array_equal(again, outs["onednn"])  # deterministic in the key
  assert np.any(other != outs["onednn"])


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="float32"):
    native_dropout.dropout(jnp.zeros(4, jnp.bfloat16), jax.random.key(0), 0.1)
  with pytest.raises(ValueError, match="rate"):
    native_dropout.dropout(jnp.zeros(4), jax.random.key(0), 1.0)
