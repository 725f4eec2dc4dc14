"""The entry point and `train_and_evaluate`: quickstart smoke run, bad input, NaN stop."""

import contextlib
import os
import sys

from absl import app
from absl.testing import flagsaver
import jax
from jax import monitoring
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from diffusion_jax.training import checkpointing
from diffusion_jax.training import params_checkpoint
from diffusion_jax.data import input_pipeline
from diffusion_jax import main
from diffusion_jax.training import train
import training_testlib


def _listing(root):
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      p = os.path.join(d, name)
      st = os.stat(p)
      out[p] = (st.st_size, st.st_mtime_ns)
  return out


@contextlib.contextmanager
def _no_compilation():
  """Fails if XLA compiles (or fetches from a compilation cache) anything inside."""
  events = []
  listener = lambda name, *a, **k: events.append(name) if "compil" in name else None
  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    monitoring.unregister_event_duration_listener(listener)
  assert not events, f"compiled before rejecting the input: {events}"


def test_modes_and_flags():
  modes = main.available_modes()
  assert modes["train"] is train.train_and_evaluate
  assert {"eval_bpd", "sample", "eval_fid", "figures"} <= set(modes)  # Evaluation jobs.
  argv = ["main", f"--config={training_testlib.REPO}/configs/digits.py:smoke",
          "--workdir=/nonexistent/never_written", "--mode=nope",
          "--config.training.batch_size=32"]
  with flagsaver.flagsaver():
    old_argv, sys.argv = sys.argv, argv
    try:
      main.FLAGS(argv)
    finally:
      sys.argv = old_argv
    assert main.FLAGS.config.training.batch_size == 32
    assert main.FLAGS.config.data.dataset == "digits"
    with pytest.raises(app.UsageError, match="Unknown --mode='nope'.*eval_bpd"):
      main.main(["main"])
    main.FLAGS.mode = "train"
    with pytest.raises(app.UsageError, match="Unexpected arguments"):
      main.main(["main", "extra"])
  assert not os.path.exists("/nonexistent/never_written")


def test_bad_input_fails_before_compiling_and_writes_nothing(tmp_path):
  # A workdir holding a checkpoint of another architecture (written without compiling).
  other = training_testlib.digits_smoke("--config.model.ch=64")
  used = tmp_path / "used"
  ckpt = checkpointing.Checkpointer(str(used), other, async_save=False)
  ckpt.save(7, {"params": {"w": np.ones(3, np.float32)}})
  ckpt.close()
  # A workdir holding a checkpoint of the same architecture (a stand-in state that a
  # restore would reject and move aside): bad data must fail before any restore.
  same = tmp_path / "same"
  ckpt = checkpointing.Checkpointer(str(same), training_testlib.digits_smoke(),
                                    async_save=False)
  ckpt.save(3, {"params": {"w": np.ones(3, np.float32)}})
  ckpt.close()
  npz = tmp_path / "images.npz"
  np.savez(npz, x=np.zeros((32, 16, 16, 1), np.uint8))  # 16x16, the config says 8.
  cases = [
      (tmp_path / "a", ["--config.data.dataset=imagenet64"], "Unknown dataset"),
      (tmp_path / "b", ["--config.training.batch_size=12"], "multiple of the 8 devices"),
      (tmp_path / "c", ["--config.data.channels=3"], "channel"),
      (tmp_path / "d", ["--config.data.dataset=npz", f"--config.data.path={npz}"],
       "16x16 but data.image_size=8"),
      (used, [], "different architecture"),
      (same, ["--config.data.dataset=imagenet64"], "Unknown dataset"),
      (same, ["--config.data.dataset=npz", f"--config.data.path={npz}"],
       "16x16 but data.image_size=8"),
  ]
  before = {used: _listing(used), same: _listing(same)}
  for workdir, overrides, message in cases:
    config = training_testlib.digits_smoke(*overrides)
    with _no_compilation(), pytest.raises(ValueError, match=message):
      train.train_and_evaluate(config, str(workdir))
    if workdir in before:
      assert _listing(workdir) == before[workdir], overrides
    else:
      assert not workdir.exists() or not os.listdir(workdir), overrides


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
  training_testlib.enable_compilation_cache(tmp_path_factory.getbasetemp() / "jax_cache")
  yield
  training_testlib.disable_compilation_cache()


def _events(workdir):
  scalars, images = {}, set()
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents"):
      continue
    for event in tf.compat.v1.train.summary_iterator(os.path.join(workdir, name)):
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if plugin == "images":
          images.add(value.tag)
        elif plugin == "scalars":
          scalars.setdefault(value.tag, []).append(
              (event.step, float(tf.make_ndarray(value.tensor))))
  return scalars, images


def test_quickstart_smoke_end_to_end_and_unreadable_fallback(tmp_path, _cache, caplog):
  """configs/digits.py:smoke through train_and_evaluate, as the quickstart runs."""
  config = training_testlib.digits_smoke()
  workdir = tmp_path / "digits"
  final = jax.device_get(train.train_and_evaluate(config, str(workdir)))
  assert int(final.step) == 10
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "5"]
  assert os.listdir(workdir / "snapshots") == ["10"]
  assert (workdir / "config.json").exists()
  png = Image.open(workdir / "samples" / "ema_step_00000010.png")
  assert png.size == (22, 22) and png.mode == "L"  # 2x2 grid of 8x8 digits, 2px padding.
  grid = np.asarray(png)
  assert grid[2:10, 2:10].std() > 0  # An image was drawn, not just the padding.
  scalars, images = _events(workdir)
  assert "samples_ema" in images
  for tag in ("loss", "grad_norm", "learning_rate", "mse", "vb", "steps_per_sec"):
    assert tag in scalars, sorted(scalars)
  assert [s for s, _ in scalars["loss"]] == [5, 10]
  assert all(np.isfinite(v) and 0 < v < 10 for _, v in scalars["loss"])
  np.testing.assert_allclose(dict(scalars["learning_rate"])[10], 1e-3, rtol=1e-6)

  # A finished run resumes, it does not restart: nothing left to do.
  again = jax.device_get(train.train_and_evaluate(config, str(workdir)))
  assert int(again.step) == 10
  for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(final)):
    np.testing.assert_array_equal(a, b)

  # Unreadable newest checkpoints: fall back to step 5, say so, and reach the same end.
  for sub in ("checkpoints", "snapshots"):
    for d, _, files in os.walk(workdir / sub / "10" / "state"):
      for f in files:
        with open(os.path.join(d, f), "wb") as fh:
          fh.write(b"corrupt")
  with caplog.at_level("WARNING"):
    redone = jax.device_get(train.train_and_evaluate(config, str(workdir)))
  assert "Falling back to checkpoint checkpoints/5" in caplog.text
  assert len(os.listdir(workdir / "unreadable_checkpoints")) == 2
  for a, b in zip(jax.tree_util.tree_leaves(redone), jax.tree_util.tree_leaves(final)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, _cache, monkeypatch):
  create = input_pipeline.create_train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    inner = create(*args, start_step=start_step, **kwargs)
    for index in range(start_step, 10 ** 9):
      batch = next(inner)
      yield batch * np.nan if index == 7 else batch  # The batch of step 8.

  monkeypatch.setattr(input_pipeline, "create_train_iterator", poisoned)
  workdir = tmp_path / "nan"
  with pytest.raises(FloatingPointError, match="at step 8"):
    train.train_and_evaluate(training_testlib.digits_smoke(), str(workdir))
  assert [s for s, _ in checkpointing.list_steps(str(workdir))] == [5]
  params, step = params_checkpoint.load_eval_params(
      str(workdir), training_testlib.digits_smoke(), use_ema=False)
  assert step == 5
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(jax.device_get(params)))


def test_checkpoints_by_minutes(tmp_path, _cache):
  """With the step cadence out of reach, the time cadence alone saves (here: every step)."""
  config = training_testlib.digits_smoke(
      "--config.training.num_train_steps=4", "--config.training.checkpoint_every_steps=1000",
      "--config.training.checkpoint_every_minutes=1e-9",
      "--config.training.max_to_keep_preemption=10")
  train.train_and_evaluate(config, str(tmp_path / "minutes"))
  assert sorted(os.listdir(tmp_path / "minutes" / "checkpoints")) == ["1", "2", "3", "4"]


def test_distributed_initialization_choice(monkeypatch):
  if not main.FLAGS.is_parsed():
    main.FLAGS.mark_as_parsed()  # Flag defaults only; no command line in this test.
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(main.os.path, "exists", lambda p: False)  # Not a TPU VM.
  with flagsaver.flagsaver(distributed=None, coordinator_address=None):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    main._initialize_distributed()
    assert calls == []
    monkeypatch.setenv("SLURM_NTASKS", "4")  # A SLURM job of 4 tasks: auto-detected.
    main._initialize_distributed()
    assert calls == [{}]
  with flagsaver.flagsaver(distributed=None, coordinator_address="10.0.0.1:1234",
                           num_processes=2, process_id=1):
    main._initialize_distributed()
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                         "process_id": 1}
  with flagsaver.flagsaver(coordinator_address="10.0.0.1:1234", num_processes=None):
    with pytest.raises(app.UsageError, match="num_processes"):
      main._initialize_distributed()
