"""The Flax FID Inception against the TorchScript translation of TF inception-2015-12-05.

The reference pipeline is independent of ours: TensorFlow's own legacy bilinear resize,
(x - 128) / 128, then the TorchScript network run by PyTorch. Ours: the JAX resize and the
Flax network with weights converted by the tools command, sharded over fake CPU devices.

pytorch-fid's `pt_inception-2015-12-05` file cannot be downloaded here. Its conversion path
is exercised with a state dict this test builds from the TorchScript weights under
torchvision's module names (the names pytorch-fid's `fid_inception_v3` loads), written
below from torchvision's Inception-v3 definition, plus a random 1008-way classifier.
That verifies the name/layout mapping and the logits; not the real file's values.
"""

import jax
import numpy as np
import pytest
import shared_data
import tensorflow as tf
import torch

from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import inception_score
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.tools import convert_inception
from diffusion_jax.tools import fid_stats

MNIST = shared_data.MNIST
CIFAR = shared_data.CIFAR

# torchvision Inception3 (num_classes=1008, aux_logits=False) conv blocks, in TF-graph
# order, with the TorchScript (TF) names they correspond to.
_TV_BLOCKS = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5",
          "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_TF_BLOCKS = {
    "A": ["conv", "tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1",
          "tower_1.conv_2", "tower_2.conv"],
    "B": ["conv", "tower.conv", "tower.conv_1", "tower.conv_2"],
    "C": ["conv", "tower.conv", "tower.conv_1", "tower.conv_2", "tower_1.conv",
          "tower_1.conv_1", "tower_1.conv_2", "tower_1.conv_3", "tower_1.conv_4",
          "tower_2.conv"],
    "D": ["tower.conv", "tower.conv_1", "tower_1.conv", "tower_1.conv_1", "tower_1.conv_2",
          "tower_1.conv_3"],
    "E": ["conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv",
          "tower_1_conv_1", "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv"],
}
_MIXED = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
          ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
          ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E")]
_STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]


def _tv_to_tf_names():
  names = {tv: "conv" + ("" if i == 0 else f"_{i}") for i, tv in enumerate(_STEM)}
  for i, (block, kind) in enumerate(_MIXED):
    tf_block = "mixed" + ("" if i == 0 else f"_{i}")
    for tv, tf_name in zip(_TV_BLOCKS[kind], _TF_BLOCKS[kind]):
      names[f"{block}.{tv}"] = f"{tf_block}.{tf_name}"
  return names


@pytest.fixture(scope="module")
def torchscript():
  path = convert_inception.default_torchscript_path()
  return path, torch.jit.load(path, map_location="cpu").eval()


@pytest.fixture(scope="module")
def ts_weights(tmp_path_factory, torchscript):
  out = str(tmp_path_factory.mktemp("inception") / "inception_fid.npz")
  summary = convert_inception.convert(torchscript[0], out)
  assert summary["kind"] == "torchscript" and summary["with_logits"] == "False"
  return out


@pytest.fixture(scope="module")
def pt_fid_weights(tmp_path_factory, torchscript):
  """A pytorch-fid-layout state dict from the TorchScript weights + a random classifier."""
  ts = dict(torchscript[1].named_parameters())
  state = {}
  for tv, tf_name in _tv_to_tf_names().items():
    prefix = f"net.layers.{tf_name}."
    state[f"{tv}.conv.weight"] = ts[prefix + "weight"].detach().clone()
    state[f"{tv}.bn.weight"] = torch.ones_like(ts[prefix + "beta"])
    state[f"{tv}.bn.bias"] = ts[prefix + "beta"].detach().clone()
    state[f"{tv}.bn.running_mean"] = ts[prefix + "mean"].detach().clone()
    state[f"{tv}.bn.running_var"] = ts[prefix + "var"].detach().clone()
    state[f"{tv}.bn.num_batches_tracked"] = torch.tensor(0)
  assert len(state) == 94 * 6 and len(ts) == 94 * 4  # every TorchScript tensor used
  gen = torch.Generator().manual_seed(0)
  state["fc.weight"] = torch.randn(1008, 2048, generator=gen) * 0.3
  state["fc.bias"] = torch.randn(1008, generator=gen)
  directory = tmp_path_factory.mktemp("pytorch_fid")
  src = str(directory / "pt_inception-like.pth")
  torch.save(state, src)
  out = str(directory / "inception_fid_is.npz")
  summary = convert_inception.convert(src, out)
  assert summary["kind"] == "pytorch-fid" and summary["with_logits"] == "True"
  return out, state["fc.weight"].numpy().astype(np.float64)


def _reference_pool3(torchscript, images_uint8):
  """TF legacy resize + (x - 128) / 128 + the TorchScript network."""
  x = images_uint8.astype(np.float32)
  if x.ndim == 3:
    x = np.repeat(x[..., None], 3, axis=-1)
  x = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False).numpy()
  x = (x - 128.0) / 128.0
  with torch.no_grad():
    return torchscript[1](torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _rel_l2(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_mnist_features_match_torchscript_sharded_over_8_devices(ts_weights, torchscript):
  # The tools path: npz source -> 8 fake devices, one grey 28x28 digit each.
  out = fid_stats.compute_features(MNIST + ":x_test", ts_weights, num=8, batch_size=8)
  assert set(out) >= {"pool3"} and "logits" not in out
  with np.load(MNIST) as data:
    ref = _reference_pool3(torchscript, data["x_test"][:8])
  assert out["pool3"].shape == (8, 2048)
  err = _rel_l2(out["pool3"], ref)
  assert err <= 1e-4, err
  assert np.linalg.norm(ref) > 1.0  # non-trivial features


def test_pytorch_fid_conversion_equals_torchscript_conversion(ts_weights, pt_fid_weights):
  ts_params, ts_logits, _ = inception_weights.load_weights(ts_weights)
  pt_params, pt_logits, meta = inception_weights.load_weights(pt_fid_weights[0])
  assert not ts_logits and pt_logits and meta["source"].startswith("pytorch-fid:")
  ts_flat = jax.tree_util.tree_leaves_with_path(ts_params)
  pt_tree = {k: v for k, v in pt_params.items() if k != "fc"}
  pt_flat = jax.tree_util.tree_leaves_with_path(pt_tree)
  assert [p for p, _ in ts_flat] == [p for p, _ in pt_flat]
  for (path, a), (_, b) in zip(ts_flat, pt_flat):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  np.testing.assert_array_equal(pt_params["fc"]["kernel"], pt_fid_weights[1].T)


def test_cifar_features_and_logits_match_reference(pt_fid_weights, torchscript):
  extractor = features_lib.InceptionFeatures.from_file(
      pt_fid_weights[0], batch_size=2, devices=jax.devices()[:2])
  assert extractor.with_logits
  with np.load(CIFAR) as data:
    images = data["x"][:2]  # [2, 32, 32, 3] uint8
  out = extractor(images)
  ref_pool3 = _reference_pool3(torchscript, images)
  assert _rel_l2(out["pool3"], ref_pool3) <= 1e-4
  # OpenAI's IS logits: pool3 @ W without the bias, in float64 from the reference pool3.
  ref_logits = ref_pool3.astype(np.float64) @ pt_fid_weights[1].T
  assert _rel_l2(out["logits"], ref_logits) <= 1e-4
  mean, std = inception_score.inception_score_from_outputs(out, splits=1)
  assert mean >= 1.0 and std == 0.0


def test_missing_classifier_and_bad_files_are_explained(ts_weights, tmp_path):
  with pytest.raises(ValueError, match="pt_inception"):
    features_lib.InceptionFeatures.from_file(ts_weights, with_logits=True)
  with pytest.raises(ValueError, match="No Inception Score"):
    inception_score.inception_score_from_outputs({"pool3": np.zeros((10, 2048))})
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    inception_weights.load_weights(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="torchvision's ImageNet"):
    inception_weights.pytorch_fid_to_flax(
        {"AuxLogits.conv0.conv.weight": np.zeros((128, 768, 1, 1))})
  with pytest.raises(FileExistsError):  # existing work is never overwritten silently
    convert_inception.convert(None, ts_weights)
  params, _, _ = inception_weights.load_weights(ts_weights)
  flat = {"/".join(k.key for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  flat.pop("Mixed_7c/branch_pool/conv/kernel")
  flat["Mixed_7b/branch1x1/bn/var"] = np.ones(7, np.float32)
  with pytest.raises(ValueError, match="missing 1.*wrong shapes: Mixed_7b/branch1x1/bn/var"):
    inception_weights.check_flat_params(flat)
  with pytest.raises(ValueError, match="not a converted Inception file"):
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    inception_weights.load_weights(str(tmp_path / "other.npz"))
