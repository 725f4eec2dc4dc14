"""The paper's figures on a tiny checkpoint, checked against the sample set (the grid shows
samples 0..n-1) and the test images (the ends of every interpolation row)."""

import numpy as np
from PIL import Image
import pytest

from diffusion_jax.data import sources
from diffusion_jax import image_grid
from diffusion_jax.evaluation import figures
from diffusion_jax.evaluation import sample_job
import eval_testlib


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  with eval_testlib.persistent_compilation_cache(str(tmp_path_factory.mktemp("xla_cache"))):
    yield eval_testlib.make_workdir(str(tmp_path_factory.mktemp("eval_workdir")))[0]


def _config():
  config = eval_testlib.tiny_eval_config()
  config.sampling.num_samples = 8
  config.sampling.shard_size = 8
  config.eval.figure_rows = 2
  config.eval.figure_columns = 4
  config.eval.figure_t_fractions = (0.5,)
  config.eval.figure_num_images = 8
  return config


def test_figures(workdir):
  config = _config()
  summary = figures.make_figures(config, workdir)
  files = summary["files"]
  assert set(files) == {"samples", "progressive_pred_x0", "progressive_x_t", "completions",
                        "interpolation", "interpolation_coarse_to_fine"}
  # The grid holds samples 0..7 of the sample job (same keys).
  set_dir = sample_job.generate_samples(config, workdir)["directory"]
  grid = np.asarray(Image.open(files["samples"]))[..., None]
  expected = image_grid.make_grid(sample_job.load_samples(set_dir, 8), num_cols=4)
  np.testing.assert_array_equal(grid, expected)
  # Interpolation rows start with x_a and end with x_b (test images 0, 1 / 2, 3).
  test = sources.load_source(config.data, config.data.eval_split).images[:4]
  interp = np.asarray(Image.open(files["interpolation"]))
  cell = lambda r, c: interp[2 + r * 10:10 + r * 10, 2 + c * 10:10 + c * 10]
  for row in range(2):
    np.testing.assert_array_equal(cell(row, 0), test[2 * row, ..., 0])
    np.testing.assert_array_equal(cell(row, 3), test[2 * row + 1, ..., 0])
  # Progressive: 2 rows of T/10-step snapshots (10 for T = 20); completions: 1 row of 4.
  assert np.asarray(Image.open(files["progressive_pred_x0"])).shape == (2 + 2 * 10,
                                                                        2 + 10 * 10)
  assert np.asarray(Image.open(files["completions"])).shape == (12, 42)
