"""Exact resume: SIGKILL and SIGTERM of real training processes, then bitwise equality.

One workdir goes through: a child killed with SIGKILL after its step-5 checkpoint, a
child resumed from it and stopped with SIGTERM (it must save and exit cleanly), and a
final in-process resume to step 10. Its state must equal, bit for bit, that of an
uninterrupted 10-step run: parameters, EMA parameters, optimizer state and step.
"""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from diffusion_jax.training import checkpointing
from diffusion_jax.training import train
import training_testlib

CHILD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "train_child.py")
N = 5  # Checkpoint cadence; the run has 2N steps.


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = training_testlib.enable_compilation_cache(
      tmp_path_factory.getbasetemp() / "jax_cache")
  yield env
  training_testlib.disable_compilation_cache()


def _config():
  return training_testlib.digits_smoke(
      f"--config.training.num_train_steps={2 * N}",
      f"--config.training.checkpoint_every_steps={N}",
      f"--config.training.snapshot_every_steps={2 * N}",
      f"--config.training.sample_every_steps={2 * N}")


def _start_child(workdir, marker, pause_at, mode, cache_env, log):
  env = dict(os.environ, **cache_env, DJ_TEST_MARKER=str(marker),
             DJ_TEST_PAUSE_AT=str(pause_at), DJ_TEST_PAUSE_MODE=mode)
  args = [sys.executable, CHILD, f"--config={training_testlib.REPO}/configs/digits.py:smoke",
          f"--workdir={workdir}", f"--config.training.num_train_steps={2 * N}",
          f"--config.training.checkpoint_every_steps={N}",
          f"--config.training.snapshot_every_steps={2 * N}",
          f"--config.training.sample_every_steps={2 * N}"]
  return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                          cwd=training_testlib.REPO)


def _wait_for(condition, proc, log_path, timeout=400):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      raise AssertionError(f"Child exited early ({proc.returncode}):\n" +
                           open(log_path).read()[-5000:])
    time.sleep(0.1)
  proc.kill()
  raise AssertionError("Timed out waiting for the child:\n" + open(log_path).read()[-5000:])


def _committed(workdir, step):
  return (step, checkpointing.CHECKPOINT_DIR) in checkpointing.list_steps(str(workdir))


def _assert_bitwise_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_sigkill_and_sigterm_resume_bitwise(tmp_path, cache_env):
  # The uninterrupted reference run (also compiles the programs the children reuse).
  reference = jax.device_get(train.train_and_evaluate(_config(), str(tmp_path / "ref")))
  assert int(reference.step) == 2 * N

  workdir = tmp_path / "run"
  # 1. SIGKILL: the child blocks when asked for the batch of step 8, after checkpoint 5.
  log_a = tmp_path / "child_kill.log"
  with open(log_a, "w") as log:
    proc = _start_child(workdir, tmp_path / "marker_a", 7, "block", cache_env, log)
    _wait_for(lambda: (tmp_path / "marker_a").exists() and _committed(workdir, N), proc,
              log_a)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert [s for s, _ in checkpointing.list_steps(str(workdir))] == [N]

  # 2. SIGTERM: the resumed child slows down from step 8 on; it must save and exit 0.
  log_b = tmp_path / "child_term.log"
  with open(log_b, "w") as log:
    proc = _start_child(workdir, tmp_path / "marker_b", 7, "slow", cache_env, log)
    _wait_for(lambda: (tmp_path / "marker_b").exists(), proc, log_b)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
  text = open(log_b).read()
  assert proc.returncode == 0, text[-5000:]
  assert f"Resuming from the checkpoint at step {N}" in text
  assert "Stopped at step" in text
  stopped = max(s for s, _ in checkpointing.list_steps(str(workdir)))
  assert N < stopped < 2 * N, text[-3000:]

  # 3. Resume in this process to the end: bitwise equal to the uninterrupted run.
  resumed = jax.device_get(train.train_and_evaluate(_config(), str(workdir)))
  assert int(resumed.step) == 2 * N
  _assert_bitwise_equal(resumed.params, reference.params)
  _assert_bitwise_equal(resumed.ema_params, reference.ema_params)
  _assert_bitwise_equal(resumed.opt_state, reference.opt_state)
  # The EMA really differs from the parameters (so the comparison above has teeth).
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(resumed.ema_params)))
