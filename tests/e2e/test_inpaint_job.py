"""The inpainting job end to end on a tiny model: known pixels kept exactly, every mask
kind, resumable shards equal to an uninterrupted run, clear errors."""

import os

import numpy as np
import pytest

from diffusion_jax.evaluation import inpaint_job
import eval_testlib


def _config(**overrides):
  config = eval_testlib.tiny_eval_config()
  config.inpaint.num_images = 5
  config.inpaint.num_completions = 2
  config.inpaint.batch_size = 8  # one shard of 8 (padded) ...
  config.inpaint.jump_length = 3
  config.inpaint.jump_n_sample = 2
  for key, value in overrides.items():
    config.inpaint[key] = value
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path, _ = eval_testlib.make_workdir(str(tmp_path_factory.mktemp("inpaint")))
  return path


def test_named_masks():
  left = inpaint_job.named_mask("left_half", 4, 1)[..., 0]
  np.testing.assert_array_equal(left, [[1, 1, 0, 0]] * 4)
  np.testing.assert_array_equal(inpaint_job.named_mask("top_half", 4, 1)[..., 0],
                                [[1] * 4, [1] * 4, [0] * 4, [0] * 4])
  center = inpaint_job.named_mask("center", 4, 1)[..., 0]
  assert center.sum() == 12 and center[1:3, 1:3].sum() == 0
  np.testing.assert_array_equal(inpaint_job.named_mask("channels:1,0,0", 2, 3),
                                np.broadcast_to([1.0, 0.0, 0.0], (2, 2, 3)))
  with pytest.raises(ValueError, match="inpaint.mask"):
    inpaint_job.named_mask("middle", 4, 1)
  with pytest.raises(ValueError, match="3 comma-separated"):
    inpaint_job.named_mask("channels:1,0", 4, 3)


def test_known_pixels_are_kept_and_a_resumed_job_is_identical(workdir, tmp_path):
  config = _config(num_images=10, batch_size=8)  # shards of 8 and 2 (8 devices)
  summary = inpaint_job.inpaint_images(config, workdir)
  directory = summary["directory"]
  shards = sorted(f for f in os.listdir(directory) if f.startswith("shard_"))
  assert len(shards) == 2 and os.path.getsize(summary["grid"]) > 0
  loaded = [np.load(os.path.join(directory, f)) for f in shards]
  completions = np.concatenate([s["completions"] for s in loaded])  # [10, 2, 8, 8, 1]
  images = np.concatenate([s["images"] for s in loaded])
  masks = np.concatenate([s["masks"] for s in loaded]).astype(bool)
  assert completions.shape == (10, 2, 8, 8, 1) and masks[:, :, :4].all()
  assert not masks[:, :, 4:].any()
  for j in range(2):  # The known (left) half is the image, bit for bit.
    np.testing.assert_array_equal(completions[:, j][masks], images[masks])
  # The unknown half was generated: it differs between completions.
  assert np.any(completions[:, 0][~masks] != completions[:, 1][~masks])
  # Kill after the first shard: the rerun writes the rest, identical.
  for f in shards[1:]:
    os.remove(os.path.join(directory, f))
  again = inpaint_job.inpaint_images(config, workdir)
  rerun = np.concatenate([np.load(os.path.join(directory, f))["completions"]
                          for f in shards])
  np.testing.assert_array_equal(rerun, completions)
  assert again["directory"] == directory


def test_mask_files_and_errors(workdir, tmp_path):
  masks = np.zeros((1, 8, 8), np.uint8)
  masks[0, :, ::2] = 1  # every other column known (0/1 masks as the job saves them)
  np.savez(tmp_path / "mask.npz", m=masks, other=np.zeros((1, 8, 8), np.uint8))
  summary = inpaint_job.inpaint_images(
      _config(num_images=2, mask=f"{tmp_path / 'mask.npz'}:m"), workdir)
  shard = np.load(os.path.join(summary["directory"], "shard_000000.npz"))
  known = shard["masks"].astype(bool)
  assert known[:, :, ::2].all() and not known[:, :, 1::2].any()
  np.testing.assert_array_equal(shard["completions"][:, 0][known], shard["images"][known])
  with pytest.raises(ValueError, match="inpaint.mask"):
    inpaint_job.inpaint_images(_config(mask="diagonal"), workdir)
  with pytest.raises(ValueError, match="no known pixel"):
    inpaint_job.inpaint_images(_config(mask=f"{tmp_path / 'mask.npz'}:other"), workdir)
  with pytest.raises(ValueError, match="inpaint.num_completions=0"):
    inpaint_job.inpaint_images(_config(num_completions=0), workdir)
