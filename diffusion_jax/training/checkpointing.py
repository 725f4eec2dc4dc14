"""Checkpoints of the train state with orbax: preemption saves, kept snapshots, resume.

Layout under the workdir:
  checkpoints/<step>/   frequent preemption checkpoints (the latest few are kept),
  snapshots/<step>/     sparse snapshots, all kept,
  config.json           the run's configuration (human-readable copy),
  unreadable_checkpoints/  checkpoints that failed to restore, moved aside (never deleted).
Every checkpoint holds two items: `state` (the `TrainState` pytree) and `config` (the
configuration as JSON), so the architecture of any checkpoint can be read back and compared
without restoring it.

Restore takes the newest step over both directories; if it cannot be read it says so in
the log, moves it aside and falls back to the next older one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import orbax.checkpoint as ocp


PyTree = Any
CHECKPOINT_DIR = "checkpoints"
SNAPSHOT_DIR = "snapshots"
UNREADABLE_DIR = "unreadable_checkpoints"
CONFIG_FILE = "config.json"
# Model fields that change neither the parameters nor the function they compute.
_NON_ARCHITECTURE_MODEL_FIELDS = ("dropout", "dtype", "remat", "kernels")
_LEARNED_VAR_TYPES = ("learned", "learned_range")


def config_to_dict(config: ml_collections.ConfigDict | dict) -> dict:
  """Returns the config as JSON-compatible nested dicts (tuples become lists)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(json.dumps(config, default=str))


def architecture_of(config: ml_collections.ConfigDict | dict) -> dict:
  """Returns the fields that decide the network's parameters and function.

  All of `model` except dropout, the compute dtype, remat and the kernel policy, the
  image size and channels, and whether the output carries learned variances (twice the
  channels).
  """
  config = config_to_dict(config)
  model = {k: v for k, v in config.get("model", {}).items()
           if k not in _NON_ARCHITECTURE_MODEL_FIELDS}
  data = config.get("data", {})
  var_type = config.get("diffusion", {}).get("model_var_type")
  arch = {f"model.{k}": v for k, v in sorted(model.items())}
  arch["data.image_size"] = data.get("image_size")
  arch["data.channels"] = data.get("channels")
  arch["diffusion.model_var_type (learned)"] = var_type in _LEARNED_VAR_TYPES
  return arch


def resolve_workdir(workdir: str) -> str:
  """Returns an absolute local path, or a remote path (gs://...) unchanged."""
  workdir = os.fspath(workdir)
  return workdir if "://" in workdir else os.path.abspath(workdir)


def list_steps(workdir: str) -> list[tuple[int, str]]:
  """Returns the committed checkpoints as (step, directory name), newest first.

  Reads the directory listing only (creates nothing). When a step is in both directories,
  the preemption copy comes first.
  """
  found = []
  for rank, sub in enumerate((CHECKPOINT_DIR, SNAPSHOT_DIR)):
    path = epath.Path(workdir) / sub
    if not path.is_dir():
      continue
    for child in path.iterdir():
      if child.name.isdigit() and child.is_dir():
        found.append((int(child.name), rank, sub))
  found.sort(key=lambda item: (-item[0], item[1]))
  return [(step, sub) for step, _, sub in found]


def read_checkpoint_config(workdir: str, step: int, sub: str) -> dict | None:
  """Returns the config saved in one checkpoint, or None where it cannot be read."""
  path = epath.Path(workdir) / sub / str(step) / "config" / "metadata"
  try:
    return json.loads(path.read_text())
  except Exception:  # pylint: disable=broad-except  (missing or unreadable)
    return None


def check_architecture(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError if the workdir's newest checkpoint has another architecture.

  Only reads files. Call it before anything is compiled or written.
  """
  steps = list_steps(workdir)
  if not steps:
    return
  saved = None
  for step, sub in steps:
    saved = read_checkpoint_config(workdir, step, sub)
    if saved is not None:
      break
  if saved is None:  # The state restore will report what is unreadable.
    return
  ours, theirs = architecture_of(config), architecture_of(saved)
  diffs = [f"  {k}: checkpoint {theirs.get(k)!r}, this config {ours.get(k)!r}"
           for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
  if diffs:
    raise ValueError(
        f"The workdir {workdir} holds a checkpoint (step {step}, {sub}/) of a different "
        "architecture:\n" + "\n".join(diffs) + "\nUse a new --workdir, or the checkpoint's "
        "settings (its config is saved in the checkpoint and in config.json). Nothing was "
        "written.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json under the workdir (process 0 only)."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(config_to_dict(config), indent=2, sort_keys=True))
  tmp.replace(root / CONFIG_FILE)


class Checkpointer:
  """Preemption checkpoints and kept snapshots of one workdir, with fallback restore.

  Args:
    workdir: the run's directory.
    config: the run's configuration (saved with every checkpoint).
    max_to_keep: preemption checkpoints kept (snapshots are all kept).
    async_save: write in the background (`wait` blocks until written).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               max_to_keep: int = 2, async_save: bool = True):
    self.workdir = resolve_workdir(workdir)
    self._config = config_to_dict(config)

    def manager(sub, keep):
      return ocp.CheckpointManager(
          epath.Path(self.workdir) / sub,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
              cleanup_tmp_directories=True,
              # Both managers may save the same step at once: their cross-process
              # barriers (named after the step) need distinct names.
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix=sub)),
          item_names=("state", "config"))

    self._managers = {CHECKPOINT_DIR: manager(CHECKPOINT_DIR, max(1, int(max_to_keep))),
                      SNAPSHOT_DIR: manager(SNAPSHOT_DIR, None)}

  def latest_step(self) -> int | None:
    """Returns the newest step over both directories, or None."""
    steps = [m.latest_step() for m in self._managers.values()]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None

  def save(self, step: int, state: PyTree, *, snapshot: bool = False,
           preemption: bool = True) -> None:
    """Saves `state` at `step` (all processes must call this together).

    Args:
      step: the state's step.
      state: the train state (replicated global arrays, or host arrays).
      snapshot: also keep it in snapshots/.
      preemption: save it in checkpoints/.
    """
    subs = ([CHECKPOINT_DIR] if preemption else []) + ([SNAPSHOT_DIR] if snapshot else [])
    # The state is replicated: every process holds all of it. Writing a host copy skips
    # orbax's per-replica device slicing (which compiles per array shape) and lets the
    # next (donating) train step reuse the device buffers at once.
    state = jax.device_get(state)
    for sub in subs:
      mngr = self._managers[sub]
      if step in mngr.all_steps():
        continue
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self._config)),
                force=True)

  def restore(self, abstract_state: PyTree, step: int | None = None
              ) -> tuple[PyTree | None, int | None]:
    """Restores the newest readable checkpoint (or exactly `step`).

    An unreadable checkpoint is logged, moved to unreadable_checkpoints/ (process 0) and
    skipped in favour of the next older one.

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings (the restore target).
      step: a given step to restore; None for the newest.

    Returns:
      (state, step), or (None, None) when the workdir has no checkpoint.

    Raises:
      FileNotFoundError: `step` is given and no checkpoint has it.
      RuntimeError: checkpoints exist but none could be read.
    """
    self.wait()
    candidates = list_steps(self.workdir)
    if step is not None:
      candidates = [c for c in candidates if c[0] == step]
      if not candidates:
        raise FileNotFoundError(
            f"No checkpoint at step {step} in {self.workdir}; available: "
            f"{sorted({s for s, _ in list_steps(self.workdir)})}.")
    if not candidates:
      return None, None
    failures = []
    for cand_step, sub in candidates:
      try:
        restored = self._managers[sub].restore(cand_step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        message = f"{type(e).__name__}: {str(e)[:500]}"
        logging.error("Checkpoint %s/%d in %s is unreadable (%s).", sub, cand_step,
                      self.workdir, message)
        failures.append((cand_step, sub, message))
        continue
      if failures:
        logging.warning("Falling back to checkpoint %s/%d after unreadable checkpoint(s) "
                        "%s.", sub, cand_step, [f"{s}/{n}" for n, s, _ in failures])
        self._move_aside(failures)
      return restored.state, cand_step
    raise RuntimeError(
        f"No checkpoint in {self.workdir} could be read:\n" +
        "\n".join(f"  {sub}/{s}: {m}" for s, sub, m in failures) +
        "\nRefusing to start from scratch over them: move them away or use a new --workdir.")

  def _move_aside(self, failures) -> None:
    """Moves unreadable step directories to unreadable_checkpoints/ and reloads."""
    if jax.process_index() == 0:
      dest_root = epath.Path(self.workdir) / UNREADABLE_DIR
      dest_root.mkdir(parents=True, exist_ok=True)
      for step, sub, _ in failures:
        src = epath.Path(self.workdir) / sub / str(step)
        dest = dest_root / f"{sub}_{step}_{int(time.time())}"
        src.rename(dest)
        logging.warning("Moved unreadable checkpoint %s to %s.", src, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointing_move_aside")
    for mngr in self._managers.values():
      mngr.reload()

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is written."""
    for mngr in self._managers.values():
      mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.wait()
    for mngr in self._managers.values():
      mngr.close()
