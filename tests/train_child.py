"""Runs `python -m diffusion_jax.main` in a child process, with a test hook on the data.

Used by the resume and multi-process tests. With DJ_TEST_MARKER set, the training input
iterator writes that file when the batch with index DJ_TEST_PAUSE_AT (the batch of step
DJ_TEST_PAUSE_AT + 1) is requested, and from then on either blocks for good
(DJ_TEST_PAUSE_MODE=block: the parent kills the process) or delays every batch by a
second (slow: the parent sends SIGTERM, the run must save and stop). Nothing else about
the run changes, so its results must match an uninterrupted run bit for bit.

  python tests/train_child.py --config configs/digits.py:smoke --workdir DIR [flags]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
import jax

from diffusion_jax.data import input_pipeline
from diffusion_jax import main


def _hooked(create):
  marker = os.environ["DJ_TEST_MARKER"]
  pause_at = int(os.environ["DJ_TEST_PAUSE_AT"])
  mode = os.environ.get("DJ_TEST_PAUSE_MODE", "block")

  def create_train_iterator(*args, start_step=0, **kwargs):
    inner = create(*args, start_step=start_step, **kwargs)

    def gen():
      index = start_step
      while True:
        if index >= pause_at:
          if index == pause_at:
            with open(marker, "w") as f:
              f.write(str(index))
          if mode == "block":
            while True:
              time.sleep(1.0)
          time.sleep(1.0)
        yield next(inner)
        index += 1
    return gen()
  return create_train_iterator


if __name__ == "__main__":
  if os.environ.get("DJ_TEST_MARKER"):
    input_pipeline.create_train_iterator = _hooked(input_pipeline.create_train_iterator)
  jax.config.config_with_absl()
  app.run(main.main)
