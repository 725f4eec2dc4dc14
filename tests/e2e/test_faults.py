"""Faults injected into real training runs: damaged checkpoints and snapshots, a snapshot
lost between a step's two copies, a full disk. Nothing is lost, every run ends bitwise
equal to an uninterrupted one, and a failed save stops the run with one clear line.

Runs (configs/digits.py:smoke, 20 steps, checkpoints every 5, snapshots every 10):
  reference   uninterrupted, in this process (its snapshots are the ones to reproduce);
  damaged     10 steps, 64 bytes of the newest checkpoint's largest array file
              overwritten, then resumed to 20;
  snapshot    10 steps, the snapshot of step 10 damaged, then resumed to 20;
  lost        10 steps, the snapshot of step 10 removed (as a kill between the step's
              two copies leaves it: the copy in checkpoints/ committed, the snapshot not),
              then resumed to 20;
  full disk   a child process with its file size capped below one array file, resumed
              from step 5; then rerun without the cap.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffusion_jax.training import checkpointing
from diffusion_jax.training import run_setup
from diffusion_jax.training import train
from diffusion_jax import sharding
import training_testlib

STEPS = 20
OVERRIDES = (f"--config.training.num_train_steps={STEPS}",
             "--config.training.checkpoint_every_steps=5",
             "--config.training.snapshot_every_steps=10",
             f"--config.training.sample_every_steps={STEPS}")


def _config(steps=STEPS):
  return training_testlib.digits_smoke(*OVERRIDES,
                                       f"--config.training.num_train_steps={steps}")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
  env = training_testlib.enable_compilation_cache(
      tmp_path_factory.getbasetemp() / "jax_cache")
  yield env
  training_testlib.disable_compilation_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_env):
  """The uninterrupted run: its final state and its snapshots, as host arrays."""
  del cache_env
  workdir = tmp_path_factory.mktemp("reference")
  final = jax.device_get(train.train_and_evaluate(_config(), str(workdir)))
  snapshots = {step: _read(workdir, checkpointing.SNAPSHOT_DIR, step) for step in (10, 20)}
  return final, snapshots


def _read(workdir, sub, step):
  config = _config()
  mesh = sharding.make_mesh(jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(str(workdir), config, async_save=False)
  try:
    state, problem = ckpt._read_verified(  # pylint: disable=protected-access
        sub, step, run_setup.abstract_train_state(config, mesh))
  finally:
    ckpt.close()
  assert problem is None, problem
  return jax.device_get(state)


def _assert_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _damage(step_dir):
  """Overwrites 64 bytes in the middle of the largest array file of a checkpoint."""
  files = [os.path.join(root, f) for root, _, names in os.walk(step_dir / "state")
           for f in names]
  target = max(files, key=os.path.getsize)
  size = os.path.getsize(target)
  assert size > 1000, (target, size)
  with open(target, "r+b") as f:
    f.seek(size // 2)
    old = f.read(64)
    f.seek(size // 2)
    f.write(bytes(255 - b for b in old))
  return target


def _run_to_ten(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(_config(10), str(workdir))
  assert sorted(checkpointing.list_steps(str(workdir))) == [
      (5, checkpointing.CHECKPOINT_DIR), (10, checkpointing.CHECKPOINT_DIR),
      (10, checkpointing.SNAPSHOT_DIR)]
  return workdir


def _moved_aside(workdir):
  path = workdir / checkpointing.UNREADABLE_DIR
  return sorted(os.listdir(path)) if path.exists() else []


def test_damaged_newest_checkpoint_falls_back_to_the_same_steps_snapshot(
    tmp_path, reference, caplog):
  workdir = _run_to_ten(tmp_path)
  _damage(workdir / checkpointing.CHECKPOINT_DIR / "10")
  with caplog.at_level("WARNING"):
    final = jax.device_get(train.train_and_evaluate(_config(), str(workdir)))
  text = caplog.text
  assert "checkpoints/10" in text and "unusable" in text, text[-3000:]
  assert ("first mismatching array" in text) or ("unreadable" in text), text[-3000:]
  assert [n.rsplit("_", 1)[0] for n in _moved_aside(workdir)] == ["checkpoints_10"]
  _assert_bitwise_equal(final, reference[0])
  for step, state in reference[1].items():
    _assert_bitwise_equal(_read(workdir, checkpointing.SNAPSHOT_DIR, step), state)


def test_damaged_snapshot_is_written_again(tmp_path, reference, caplog):
  workdir = _run_to_ten(tmp_path)
  _damage(workdir / checkpointing.SNAPSHOT_DIR / "10")
  with caplog.at_level("WARNING"):
    final = jax.device_get(train.train_and_evaluate(_config(), str(workdir)))
  assert "snapshot of step 10 again" in caplog.text, caplog.text[-3000:]
  assert [n.rsplit("_", 1)[0] for n in _moved_aside(workdir)] == ["snapshots_10"]
  _assert_bitwise_equal(final, reference[0])
  for step, state in reference[1].items():
    _assert_bitwise_equal(_read(workdir, checkpointing.SNAPSHOT_DIR, step), state)


def test_snapshot_lost_between_the_two_copies_is_written_again(tmp_path, reference):
  workdir = _run_to_ten(tmp_path)
  # A kill after checkpoints/10 committed and while snapshots/10 was being written
  # leaves the snapshot as an uncommitted temporary directory.
  snap = workdir / checkpointing.SNAPSHOT_DIR
  os.rename(snap / "10", snap / "10.orbax-checkpoint-tmp-1")
  final = jax.device_get(train.train_and_evaluate(_config(), str(workdir)))
  assert {s for s, sub in checkpointing.list_steps(str(workdir))
          if sub == checkpointing.SNAPSHOT_DIR} == {10, 20}
  assert not any(name.startswith("10.") for name in os.listdir(snap))
  _assert_bitwise_equal(final, reference[0])
  for step, state in reference[1].items():
    _assert_bitwise_equal(_read(workdir, checkpointing.SNAPSHOT_DIR, step), state)


def _hashes(root):
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _main(workdir, steps, env, fsize=None):
  """`python -m diffusion_jax.main` in a child, optionally with its file size capped
  (`prlimit --fsize`: writes past the cap fail with EFBIG, as on a full disk)."""
  args = [sys.executable, "-m", "diffusion_jax.main",
          f"--config={training_testlib.REPO}/configs/digits.py:smoke",
          f"--workdir={workdir}", *OVERRIDES, f"--config.training.num_train_steps={steps}"]
  if fsize:
    args = [shutil.which("prlimit"), f"--fsize={fsize}", *args]
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                        cwd=training_testlib.REPO)


def test_full_disk_stops_with_one_line_and_resumes_bitwise(tmp_path, reference, cache_env):
  env = dict(os.environ, **cache_env)  # The programs are in the cache: nothing to write.
  workdir = tmp_path / "run"
  first = _main(workdir, 5, env)
  assert first.returncode == 0, first.stderr[-3000:]
  state_file = max((os.path.join(b, f) for b, _, n in os.walk(workdir / "checkpoints")
                    for f in n), key=os.path.getsize)
  limit = os.path.getsize(state_file) // 2  # below one array file, above everything else
  before = _hashes(workdir / "checkpoints" / "5")
  capped = _main(workdir, STEPS, env, fsize=limit)
  assert capped.returncode == 1, capped.stderr[-3000:]
  assert capped.stderr.count("Traceback") == 0, capped.stderr[-5000:]
  last = capped.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Saving the checkpoint of step 10 failed"), last
  assert "File too large" in last and "Errno 27" in last and str(workdir) in last, last
  assert "kept: step 5 (checkpoints/5)" in last and "rerun the same command" in last, last
  # Saves run in the background: the failure stops the run at its next check, at the
  # latest before the next save (step 15) starts; nothing after step 5 was committed.
  assert "step 20:" not in capped.stderr
  assert {step for step, _ in checkpointing.list_steps(str(workdir))} == {5}
  assert _hashes(workdir / "checkpoints" / "5") == before
  rerun = _main(workdir, STEPS, env)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Resuming from the checkpoint at step 5" in rerun.stderr
  _assert_bitwise_equal(_read(workdir, checkpointing.SNAPSHOT_DIR, STEPS),
                        reference[1][STEPS])
