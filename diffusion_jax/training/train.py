"""The training loop: `train_and_evaluate(config, workdir)`.

Order of work, so that bad settings fail fast and never damage a workdir:
  1. checks that need nothing (config values, batch vs. device count, model config);
  2. the architecture of any checkpoint already in the workdir (read-only);
  3. the training data (dataset, sizes, channels are checked when it is opened);
  4. the network's operations (the kernel policy; an error if `native` cannot be built);
  5. restore of the newest readable checkpoint (falling back past unreadable ones, which
     are moved aside) and the input pipeline at the restored step;
  6. only then config.json, TensorBoard writer, compilation and training.

Checkpoints: every `checkpoint_every_steps` steps and every `checkpoint_every_minutes`
minutes into checkpoints/ (the latest few kept), every `snapshot_every_steps` steps into
snapshots/ (all kept), the last step into both, and one more on SIGTERM, after which the
run returns normally (rerun the same command to resume). A resumed run continues
bit-for-bit: the state is restored exactly and batches, noise and dropout are functions of
the step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from diffusion_jax import image_grid
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax import validation
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources
from diffusion_jax.training import checkpointing
from diffusion_jax.training import run_setup
from diffusion_jax.training import train_state as train_state_lib

SAMPLES_DIR = "samples"


class _StopRequest:
  """Set by SIGTERM (preemption); the loop checkpoints and returns at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
  """True if `flag` is true on any process (all processes must call this together)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def _flatten_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(f"{prefix}{k}.", v)
      else:
        out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

  walk("", config.to_dict())
  return out


def _summarize(pending: list[tuple[int, dict]]) -> dict[str, float]:
  """Fetches the metrics of the steps since the last summary; raises at a non-finite one.

  Returns the means over those steps (the learning rate: that of the last step).
  """
  fetched = jax.device_get([m for _, m in pending])
  for (step, _), m in zip(pending, fetched):
    if not bool(m["finite"]):
      raise FloatingPointError(
          f"Non-finite training loss ({float(m['loss'])}) or gradient norm "
          f"({float(m['grad_norm'])}) at step {step + 1}. Training stopped; that update "
          "was not applied and no state after it was saved. Lower optim.learning_rate, "
          "check the data, or use a more stable diffusion.loss_type / model_mean_type.")
  summary = {k: float(np.mean([m[k] for m in fetched]))
             for k in fetched[0] if k not in ("finite", "learning_rate")}
  if "learning_rate" in fetched[-1]:
    summary["learning_rate"] = float(fetched[-1]["learning_rate"])  # Of the last step.
  return summary


def _save_samples(sample_fn, state, mesh, num_images: int, step: int, workdir: str,
                  writer) -> None:
  """Writes the grid of samples 0..N-1 (`sampling`) of the EMA parameters."""
  images = sampling.sample_indices(sample_fn, state.ema_params, np.arange(num_images),
                                   mesh)  # [N, H, W, C] in [-1, 1]
  grid = image_grid.make_grid(images)
  if jax.process_index() == 0:
    path = image_grid.save_png(
        os.path.join(workdir, SAMPLES_DIR, f"ema_step_{step:08d}.png"), grid)
    logging.info("Wrote samples of the EMA parameters at step %d to %s.", step, path)
  writer.write_images(step, {"samples_ema": grid[None]})


def _is_snapshot_step(step: int, t_cfg: ml_collections.ConfigDict) -> bool:
  """Whether `step` is saved in snapshots/ (every `snapshot_every_steps`, and the last)."""
  return step % int(t_cfg.snapshot_every_steps) == 0 or step == int(t_cfg.num_train_steps)


def _raise_failed_save(ckpt: checkpointing.Checkpointer) -> None:
  """Stops every process at once when a background save failed on any of them."""
  if not _any_process(ckpt.failed()):
    return
  ckpt.check()  # Raises this process's failure.
  raise checkpointing.CheckpointWriteError(
      "Saving a checkpoint failed on another process (its log names the path and "
      "the cause). Training stopped; rerun the same command to resume once it is fixed.")


def _grid_sampling_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the training sample grids: the model's own reverse variances (the
  Analytic-DPM ones need Gamma of a finished checkpoint)."""
  if str(config.sampling.get("variance", "model")) == "model":
    return config
  grid = ml_collections.ConfigDict(config.to_dict())
  grid.sampling.variance = "model"
  return grid


def _fid_sampling_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with the sampler of FID during training (`training.fid_sampler`)."""
  fast = ml_collections.ConfigDict(_grid_sampling_config(config).to_dict())
  fast.sampling.sampler = str(config.training.fid_sampler)
  fast.sampling.num_steps = int(config.training.fid_num_steps)
  fast.sampling.spacing = ""
  return fast


def _check_training_fid(config: ml_collections.ConfigDict) -> None:
  """Fails fast when FID during training is on but cannot run (weights, references,
  sampler)."""
  if int(config.training.get("fid_every_steps", 0)) <= 0:
    return
  from diffusion_jax.evaluation import sample_quality  # pylint: disable=g-import-not-at-top
  sample_quality.check_inputs(config)
  sampling.check_sampler(_fid_sampling_config(config))


class _TrainingFid:
  """FID/KID of the EMA parameters during training (`training.fid_every_steps` > 0).

  Samples 0..M-1 of the sampling stream (the same each time) with the fast sampler of
  `training.fid_sampler` / `fid_num_steps`, scored by `evaluation.sample_quality` against
  references computed once and cached in the workdir.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model, schedule,
               mesh, jit_options):
    from diffusion_jax.evaluation import sample_quality  # pylint: disable=g-import-not-at-top
    t = config.training
    fast = _fid_sampling_config(config)
    self.every = int(t.fid_every_steps)
    self.num_samples = int(t.fid_num_samples)
    self.mesh = mesh
    self.sample_fn = sampling.make_sample_fn(model, schedule, fast, mesh, jit_options)
    self.batch = -(-int(config.sampling.batch_size) // mesh.devices.size) * (
        mesh.devices.size)
    self.quality = sample_quality.SampleQuality(config, workdir)  # the references, once
    self.tag = sampling.tag(fast)

  def __call__(self, state, step: int, writer) -> None:
    start = time.monotonic()
    images = []
    for first in range(0, self.num_samples, self.batch):
      indices = np.arange(first, min(first + self.batch, self.num_samples))
      images.append(image_grid.to_uint8(sampling.sample_indices(
          self.sample_fn, state.ema_params, indices, self.mesh)))
    metrics = self.quality.evaluate(np.concatenate(images))
    scalars = {f"{name.split('_')[0]}/{name}": float(value)
               for name, value in metrics.items()
               if name.startswith(("fid", "kid", "precision", "recall"))
               and isinstance(value, (int, float)) and not isinstance(value, bool)}
    writer.write_scalars(step, scalars)
    logging.info("step %d: %s (%d samples, %s, %.0f s)", step,
                 ", ".join(f"{k.split('/')[1]}={v:.4g}" for k, v in sorted(scalars.items())),
                 self.num_samples, self.tag, time.monotonic() - start)


def _with_resolved_kernels(config: ml_collections.ConfigDict,
                           ops) -> ml_collections.ConfigDict:
  """The config as written to config.json: `model.kernels` as resolved for this program."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.kernels = ops.name
  return config


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> train_state_lib.TrainState:
  """Trains (or resumes) the run of `config` in `workdir`; returns the final state.

  Args:
    config: the experiment config (see `config_base`).
    workdir: directory of checkpoints, config.json, TensorBoard events and samples.

  Raises:
    ValueError: bad settings, data that do not match the config, or a workdir holding a
      checkpoint of another architecture (before anything is compiled or written).
    FloatingPointError: a non-finite loss or gradient norm (the last good checkpoint is
      kept).
  """
  workdir = checkpointing.resolve_workdir(workdir)
  t_cfg = config.training
  mesh = sharding.make_mesh()
  validation.validate_config(config, mesh)
  _check_training_fid(config)
  checkpointing.check_architecture(workdir, config)
  num_classes = int(config.model.get("num_classes", 0))
  source = sources.load_source(config.data, config.data.train_split, num_classes)
  ops = run_setup.build_ops(config, mesh)  # may compile the CPU kernels (seconds, once)

  ckpt = None
  state, start_step = None, 0
  if checkpointing.list_steps(workdir):
    ckpt = checkpointing.Checkpointer(workdir, config,
                                      max_to_keep=t_cfg.max_to_keep_preemption)
    state, start_step = ckpt.restore(run_setup.abstract_train_state(config, mesh))
    logging.info("Resuming from the checkpoint at step %d in %s.", start_step, workdir)
  train_iter = input_pipeline.create_train_iterator(
      config.data, global_batch_size=int(t_cfg.batch_size), seed=int(config.seed),
      start_step=start_step, sharding=mesh, source=source, labels=num_classes > 0)

  # The settings and the data are good: from here on the workdir is written.
  if ckpt is None:
    ckpt = checkpointing.Checkpointer(workdir, config,
                                      max_to_keep=t_cfg.max_to_keep_preemption)
  if state is None:
    state = run_setup.init_train_state(config, mesh)
    logging.info("Starting a new run in %s.", workdir)
  elif _is_snapshot_step(start_step, t_cfg):
    # A kill between the step's copies, or a damaged snapshot, must not lose it.
    ckpt.ensure_snapshot(start_step, state, run_setup.abstract_train_state(config, mesh))
  logging.info("model.kernels=%s: %s.", config.model.get("kernels", "auto"), ops.description)
  checkpointing.write_config(workdir, _with_resolved_kernels(config, ops))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams(_flatten_config(config))
  parameter_overview.log_parameter_overview(state.params, msg="U-Net parameters")

  model = run_setup.build_model(config, ops)
  if config.model.remat and mesh.devices.flat[0].platform == "cpu":
    logging.warning("model.remat=True saves no memory on CPU: XLA:CPU merges the "
                    "recomputed blocks back into the forward pass. It acts on GPU and TPU.")
  schedule = run_setup.build_schedule(config)
  train_step = run_setup.build_train_step(config, mesh, ops)
  sample_fn = sampling.make_sample_fn(model, schedule, _grid_sampling_config(config), mesh,
                                      ops.jit_options())
  training_fid = (_TrainingFid(config, workdir, model, schedule, mesh, ops.jit_options())
                  if int(t_cfg.get("fid_every_steps", 0)) > 0 else None)
  num_steps = int(t_cfg.num_train_steps)
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  sync_every = 1 if jax.process_count() == 1 else int(t_cfg.log_every_steps)
  last_save_time = time.monotonic()
  pending: list[tuple[int, dict]] = []
  step = start_step
  logging.info("Training from step %d to %d, global batch %d over %d device(s).",
               start_step, num_steps, t_cfg.batch_size, jax.device_count())
  try:
    with _StopRequest() as stop:
      while step < num_steps:
        batch = next(train_iter)  # [B, H, W, C] in [-1, 1] (and [B] labels), sharded
        state, metrics = train_step(state, *(batch if num_classes else (batch,)))
        pending.append((step, metrics))
        step += 1
        report(step)
        last = step == num_steps
        stopping = minutes_due = False
        if step % sync_every == 0 or last:
          _raise_failed_save(ckpt)
          minutes_due = (time.monotonic() - last_save_time >=
                         60.0 * float(t_cfg.checkpoint_every_minutes))
          stopping, minutes_due = _any_process(stop.requested), _any_process(minutes_due)
        preempt = (step % int(t_cfg.checkpoint_every_steps) == 0 or minutes_due or last or
                   stopping)
        snapshot = _is_snapshot_step(step, t_cfg)
        if step % int(t_cfg.log_every_steps) == 0 or preempt or snapshot:
          summary = _summarize(pending)  # Raises before any NaN state could be saved.
          pending = []
          writer.write_scalars(step, summary)
          logging.info("step %d: %s", step,
                       ", ".join(f"{k}={v:.5g}" for k, v in sorted(summary.items())))
        if preempt or snapshot:
          # Every process finishes its previous save and learns whether any failed
          # before this one starts: a failure stops them all together.
          ckpt.wait(raise_failure=False)
          _raise_failed_save(ckpt)
          ckpt.save(step, state, snapshot=snapshot, preemption=preempt)
          last_save_time = time.monotonic()
        if step % int(t_cfg.sample_every_steps) == 0 or last:
          _save_samples(sample_fn, state, mesh, int(t_cfg.num_sample_images), step,
                        workdir, writer)
        if training_fid is not None and step % training_fid.every == 0:
          training_fid(state, step, writer)
        if stopping:
          logging.warning("Stopped at step %d after a checkpoint; rerun the same command "
                          "to resume.", step)
          break
  except BaseException:
    ckpt.close(raise_failure=False)  # Waits for the background save; keeps this error.
    writer.flush()
    raise
  ckpt.close()  # Waits for the background save; raises if it failed.
  writer.flush()
  return state
