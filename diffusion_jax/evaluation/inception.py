"""The Inception-v3 network of the TF FID graph `inception-2015-12-05`, in Flax Linen (NHWC).

This is the network behind TTUR's FID and OpenAI's Inception Score (and the TorchScript
translations used by StyleGAN3/EDM and pytorch-fid's `FIDInceptionA/C/E`). It differs from
torchvision's Inception-v3 in ways that change FID:
  * batch norm has no scale (gamma = 1) and eps = 1e-3 (TF); the statistics are frozen;
  * the 3x3 average pools inside the mixed blocks exclude the padding from the count
    (TF "SAME" average pooling, `count_include_pad=False`);
  * the pooling branch of the last mixed block (`Mixed_7c`, TF `mixed_10`) uses a 3x3 max
    pool (stride 1, padding 1), not an average pool;
  * the classifier has 1008 outputs.

Input: [B, 299, 299, 3] float32 in [-1, 1) i.e. (x - 128) / 128 (see `resize.py`).
Outputs: `pool3` [B, 2048] (the FID features: the global 8x8 average pool of `Mixed_7c`)
and, when the classifier weights are present, `logits` [B, 1008] = pool3 @ W, without the
bias, exactly as OpenAI's Inception Score code (`softmax/logits/MatMul` input 1).

Module names follow torchvision/pytorch-fid (`Conv2d_1a_3x3`, `Mixed_5b/branch1x1`, ...);
each conv block holds `conv/kernel` [kh, kw, in, out] and batch-norm `bn/{scale, bias,
mean, var}`, all in the `params` collection (frozen weights, a plain pytree).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPSILON = 1e-3
NUM_CLASSES = 1008
FEATURE_DIM = 2048


class FrozenBatchNorm(nn.Module):
  """Inference batch norm with stored statistics: (x - mean) / sqrt(var + eps) * scale + bias."""
  features: int
  epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    shape = (self.features,)
    scale = self.param("scale", nn.initializers.ones, shape)
    bias = self.param("bias", nn.initializers.zeros, shape)
    mean = self.param("mean", nn.initializers.zeros, shape)
    var = self.param("var", nn.initializers.ones, shape)
    return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class ConvBNReLU(nn.Module):
  """Conv without bias -> frozen batch norm -> ReLU, with explicit symmetric padding."""
  features: int
  kernel_size: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=(self.strides, self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = FrozenBatchNorm(self.features, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jnp.ndarray) -> jnp.ndarray:
  # TF "SAME" average pool: the padded cells are not counted.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block (TF `mixed`, `mixed_1`, `mixed_2`)."""
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = lambda f, k, p, name: ConvBNReLU(f, k, padding=p, precision=self.precision,
                                            name=name)
    b1 = conv(64, (1, 1), (0, 0), "branch1x1")(x)
    b5 = conv(48, (1, 1), (0, 0), "branch5x5_1")(x)
    b5 = conv(64, (5, 5), (2, 2), "branch5x5_2")(b5)
    b3 = conv(64, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), (1, 1), "branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction (TF `mixed_3`)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b3 = ConvBNReLU(384, (3, 3), strides=2, precision=self.precision, name="branch3x3")(x)
    bd = ConvBNReLU(64, (1, 1), precision=self.precision, name="branch3x3dbl_1")(x)
    bd = ConvBNReLU(96, (3, 3), padding=(1, 1), precision=self.precision,
                    name="branch3x3dbl_2")(bd)
    bd = ConvBNReLU(96, (3, 3), strides=2, precision=self.precision,
                    name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorized 7x7 convolutions (TF `mixed_4` ... `mixed_7`)."""
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    c7 = self.channels_7x7
    conv = lambda f, k, p, name: ConvBNReLU(f, k, padding=p, precision=self.precision,
                                            name=name)
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = conv(192, (1, 1), (0, 0), "branch1x1")(x)
    b7 = conv(c7, (1, 1), (0, 0), "branch7x7_1")(x)
    b7 = conv(c7, *row, "branch7x7_2")(b7)
    b7 = conv(192, *col, "branch7x7_3")(b7)
    bd = conv(c7, (1, 1), (0, 0), "branch7x7dbl_1")(x)
    bd = conv(c7, *col, "branch7x7dbl_2")(bd)
    bd = conv(c7, *row, "branch7x7dbl_3")(bd)
    bd = conv(c7, *col, "branch7x7dbl_4")(bd)
    bd = conv(192, *row, "branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), (0, 0), "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction (TF `mixed_8`)."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = lambda f, k, p, s, name: ConvBNReLU(f, k, strides=s, padding=p,
                                               precision=self.precision, name=name)
    b3 = conv(192, (1, 1), (0, 0), 1, "branch3x3_1")(x)
    b3 = conv(320, (3, 3), (0, 0), 2, "branch3x3_2")(b3)
    b7 = conv(192, (1, 1), (0, 0), 1, "branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), (0, 3), 1, "branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), (3, 0), 1, "branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), (0, 0), 2, "branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter banks (TF `mixed_9`, `mixed_10`).

  Attributes:
    max_pool: the pooling branch uses a 3x3 max pool (the FID network's `mixed_10`)
      instead of the TF-"SAME" 3x3 average pool (`mixed_9`).
  """
  max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = lambda f, k, p, name: ConvBNReLU(f, k, padding=p, precision=self.precision,
                                            name=name)
    b1 = conv(320, (1, 1), (0, 0), "branch1x1")(x)
    b3 = conv(384, (1, 1), (0, 0), "branch3x3_1")(x)
    b3a = conv(384, (1, 3), (0, 1), "branch3x3_2a")(b3)
    b3b = conv(384, (3, 1), (1, 0), "branch3x3_2b")(b3)
    bd = conv(448, (1, 1), (0, 0), "branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), (1, 1), "branch3x3dbl_2")(bd)
    bda = conv(384, (1, 3), (0, 1), "branch3x3dbl_3a")(bd)
    bdb = conv(384, (3, 1), (1, 0), "branch3x3dbl_3b")(bd)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = conv(192, (1, 1), (0, 0), "branch_pool")(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class UnbiasedLogits(nn.Module):
  """pool3 @ W of the classifier (`softmax/logits/MatMul`), without its bias.

  OpenAI's Inception Score code takes input 1 of `softmax/logits/MatMul` and multiplies
  pool3 by it, dropping the graph's bias; so only the kernel [2048, 1008] is kept.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, pool3: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.zeros, (FEATURE_DIM, NUM_CLASSES))
    return jnp.dot(pool3, kernel, precision=self.precision)


class InceptionV3FID(nn.Module):
  """The TF FID Inception-v3 up to pool3, plus the optional 1008-way classifier.

  Attributes:
    with_logits: also compute the unbiased 1008-way logits (needs the `fc` weights).
    precision: matmul/conv precision; HIGHEST keeps float32 on accelerators (TF32/bf16
      would move FID).
  """
  with_logits: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    """Returns {'pool3': [B, 2048]} (+ 'logits': [B, 1008]) for x [B, 299, 299, 3] in [-1, 1)."""
    p = self.precision
    x = ConvBNReLU(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)  # [B,149,149,32]
    x = ConvBNReLU(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)  # [B,147,147,32]
    x = ConvBNReLU(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
    x = ConvBNReLU(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
    x = ConvBNReLU(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # [B, 35, 35, 256]
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # [B, 35, 35, 288]
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # [B, 35, 35, 288]
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # [B, 17, 17, 768]
    x = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x = InceptionC(160, precision=p, name="Mixed_6d")(x)
    x = InceptionC(192, precision=p, name="Mixed_6e")(x)  # [B, 17, 17, 768]
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # [B, 8, 8, 1280]
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)  # [B, 8, 8, 2048]
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
    pool3 = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    out = {"pool3": pool3}
    if self.with_logits:
      out["logits"] = UnbiasedLogits(precision=p, name="fc")(pool3)  # [B, 1008]
    return out


def param_shapes(with_logits: bool) -> Dict[str, Tuple[int, ...]]:
  """Returns {'/'-joined parameter path: shape} of `InceptionV3FID(with_logits)`."""
  abstract = jax.eval_shape(
      lambda: InceptionV3FID(with_logits=with_logits).init(
          jax.random.key(0), jnp.zeros((1, 299, 299, 3), jnp.float32))["params"])
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    flat["/".join(k.key for k in path)] = tuple(leaf.shape)
  return flat

