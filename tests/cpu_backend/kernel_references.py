"""Independent references for the CPU backend's kernels, shared by the tests here.

- `numpy_conv_and_grads`: the 3x3 convolution with TF "SAME" padding written in float64
  NumPy from the definition (zero padding, strided 3x3 windows), with its two gradients:
  dx scatters g @ W[i, j]^T back onto the windows, dW[i, j] sums window^T @ g.
- `group_norm_values_and_grads`: the textbook GroupNorm (+ swish) formula (mean and
  variance over the pixels and the channels of each group of a [B, P, G, C/G] view,
  affine, swish) in float64, its gradients by JAX's autodiff of the same formula:
  independent of both the closed form of `ops.group_norm` and the C++ kernels.
- `philox4x32_10` and `reference_mask`: Philox4x32-10 written in NumPy from Salmon et al.
  (2011), and the dropout mask it gives the elements of a global index range (element g:
  counter (g // 4 as two 32-bit words, 0, 0), word g % 4, kept iff the word is below
  keep * 2^32).
- The one- and eight-device meshes of the test session (tests/conftest.py makes 8 fake
  CPU devices).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.ops import reference

EPSILON = 1e-6
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def one_device_mesh():
  """The data-parallel mesh of the session's first device."""
  return sharding.make_mesh(jax.devices()[:1])


def eight_device_mesh():
  """The data-parallel mesh of all 8 fake devices."""
  devices = jax.devices()
  assert len(devices) == 8, devices
  return sharding.make_mesh(devices)


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_rel(a, b) -> float:
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _windows(x_pad, stride, out_h, out_w):
  for i in range(3):
    for j in range(3):
      yield i, j, x_pad[:, i:i + stride * (out_h - 1) + 1:stride,
                        j:j + stride * (out_w - 1) + 1:stride, :]


def numpy_conv_and_grads(x, w, g, stride):
  """float64 y = conv(x, w) with TF "SAME" padding, and dx, dw for output cotangent g.

  (With a bias b, y + b, and db = g summed over batch and positions.)
  """
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  (top, bottom), (left, right) = [reference.same_padding(n, stride) for n in x.shape[1:3]]
  x_pad = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = g.shape[1:3]
  y = np.zeros(g.shape)
  dx_pad = np.zeros(x_pad.shape)
  dw = np.zeros(w.shape)
  for i, j, window in _windows(x_pad, stride, out_h, out_w):
    y += window @ w[i, j]
    dw[i, j] = np.einsum("bhwc,bhwo->co", window, g)
    dx_pad[:, i:i + stride * (out_h - 1) + 1:stride,
           j:j + stride * (out_w - 1) + 1:stride, :] += g @ w[i, j].T
  dx = dx_pad[:, top:top + x.shape[1], left:left + x.shape[2], :]
  return y, dx, dw


def _textbook_group_norm(x, scale, bias, groups, swish, epsilon):
  """float64 textbook GroupNorm (+ swish) in jax.numpy, for values and autodiff."""
  b, c = x.shape[0], x.shape[-1]
  grouped = x.reshape(b, -1, groups, c // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
  a = ((grouped - mean) / jnp.sqrt(var + epsilon)).reshape(x.shape) * scale + bias
  return a * jax.nn.sigmoid(a) if swish else a


def group_norm_values_and_grads(x, scale, bias, g, groups, swish, epsilon=EPSILON):
  """float64 (y, dx, dscale, dbias) of the textbook GroupNorm for output cotangent g."""
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, bias))
    y, vjp = jax.vjp(lambda *a: _textbook_group_norm(*a, groups, swish, epsilon), *args)
    grads = vjp(jnp.asarray(np.asarray(g, np.float64)))
    return tuple(np.asarray(a) for a in (y,) + grads)


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


def reference_mask(size: int, words, keep: float, first: int = 0) -> np.ndarray:
  """The kept flags of global elements first, ..., first + size - 1 (bool [size]).

  Element g takes word g % 4 of Philox4x32-10 at counter (g // 4 as two 32-bit words,
  0, 0) under the key (words[0], words[1]).
  """
  g = np.arange(first, first + size, dtype=np.uint64)
  blocks = g >> np.uint64(2)
  counters = np.stack([blocks & np.uint64(MASK32), blocks >> np.uint64(32),
                       np.zeros_like(blocks), np.zeros_like(blocks)],
                      axis=1).astype(np.uint32)
  stream = philox4x32_10(counters, (int(words[0]), int(words[1])))
  word = stream[np.arange(size), (g & np.uint64(3)).astype(np.int64)]
  # The kernel's keep is float32 (its attribute): the threshold is float32(keep) 2^32.
  return word < np.uint64(int(float(np.float32(keep)) * 2.0**32 + 0.5))
