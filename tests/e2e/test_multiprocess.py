"""Two real processes with 4 CPU devices each train like one process with 8 devices.

The children run the command-line entry point with the coordinator flags
(`--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id i`), read their own
rows of every global batch, and write one shared checkpoint. Its state must match, to
float32 tolerance, the state of the same run in this process over 8 devices.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.training import checkpointing
from diffusion_jax.training import run_setup
from diffusion_jax import sharding
from diffusion_jax.training import train
import training_testlib

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "train_child.py")
STEPS = 3
OVERRIDES = (f"--config.training.num_train_steps={STEPS}",
             "--config.training.num_sample_images=8")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = training_testlib.enable_compilation_cache(
      tmp_path_factory.getbasetemp() / "jax_cache")
  yield env
  training_testlib.disable_compilation_cache()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path, cache_env):
  workdir = tmp_path / "multi"
  port = _free_port()
  env = dict(os.environ, **cache_env, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  env.pop("DJ_TEST_MARKER", None)
  procs, logs = [], []
  for i in range(2):
    logs.append(tmp_path / f"proc{i}.log")
    args = [sys.executable, CHILD,
            f"--config={training_testlib.REPO}/configs/digits.py:smoke",
            f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}", *OVERRIDES]
    procs.append(subprocess.Popen(args, env=env, stdout=open(logs[i], "w"),
                                  stderr=subprocess.STDOUT, cwd=training_testlib.REPO))
  # Meanwhile, the same run in this process over 8 devices.
  config = training_testlib.digits_smoke(*OVERRIDES)
  single = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "single")))
  for proc, log in zip(procs, logs):
    try:
      proc.wait(timeout=500)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, open(log).read()[-6000:]
  text0 = open(logs[0]).read()
  assert "JAX process 0 of 2; 4 local device(s), 8 device(s) in all" in text0
  assert "JAX process 1 of 2" in open(logs[1]).read()

  assert [s for s, _ in checkpointing.list_steps(str(workdir))] == [STEPS, STEPS]
  assert os.path.exists(workdir / "samples" / f"ema_step_{STEPS:08d}.png")
  mesh = sharding.make_mesh()
  ckpt = checkpointing.Checkpointer(str(workdir), config)
  multi, step = ckpt.restore(run_setup.abstract_train_state(config, mesh))
  ckpt.close()
  assert step == STEPS and int(multi.step) == int(single.step) == STEPS
  multi = jax.device_get(multi)
  initial = jax.device_get(run_setup.init_train_state(config, mesh).params)
  moved = 0.0
  for name in ("params", "ema_params", "opt_state"):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(multi, name)),
                    jax.tree_util.tree_leaves(getattr(single, name))):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
  for a, b in zip(jax.tree_util.tree_leaves(multi.params),
                  jax.tree_util.tree_leaves(initial)):
    moved = max(moved, float(np.max(np.abs(a - b))))
  assert moved > 1e-4  # Training moved the parameters well beyond the tolerance.
