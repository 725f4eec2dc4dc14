"""Checkpoints of the train state with orbax: preemption saves, kept snapshots, resume.

Layout under the workdir:
  checkpoints/<step>/   frequent preemption checkpoints (the latest few are kept),
  snapshots/<step>/     sparse snapshots, all kept,
  config.json           the run's configuration (human-readable copy),
  unreadable_checkpoints/  checkpoints that failed to restore, moved aside (never deleted).
Every checkpoint holds three items: `state` (the `TrainState` pytree), `config` (the
configuration as JSON, so the architecture of any checkpoint can be read back and
compared without restoring it) and `digests` (a digest of every array of the state,
`training.digests`).

Saving: a step's copies (checkpoints/ and, at snapshot steps, snapshots/) are written one
after the other by one background thread from a host copy of the state, and the step is
reported saved only when every copy has committed. A failed write (no space, quota,
permission, I/O error) is kept and raised once, as a `CheckpointWriteError` naming the
path, the errno and what is kept, by the next `check`, `save`, `wait` or `close`; the
writer's own tracebacks are not logged.

Restoring takes the newest step over both directories and checks every array against its
digest; a checkpoint that cannot be read, or whose arrays differ from what was saved, is
logged with the step and the first mismatching array, moved aside, and the next older one
is used. A checkpoint without digests (written by an older version) is restored with a
note.
"""

from __future__ import annotations

import concurrent.futures
import errno as errno_lib
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

from diffusion_jax.training import digests as digests_lib
from diffusion_jax.training import write_failures

PyTree = Any
CheckpointWriteError = write_failures.CheckpointWriteError


class UnreadableCheckpoints(OSError):
  """Checkpoints exist but none could be read (the message lists each and why)."""
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
  model.setdefault("num_classes", 0)  # Configs from before class conditioning.
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
  """Preemption checkpoints and kept snapshots of one workdir, verified restore.

  Args:
    workdir: the run's directory.
    config: the run's configuration (saved with every checkpoint).
    max_to_keep: preemption checkpoints kept (snapshots are all kept).
    async_save: write in a background thread (`check` raises a failed write; `wait`
      blocks until written).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               max_to_keep: int = 2, async_save: bool = True):
    self.workdir = resolve_workdir(workdir)
    self._config = config_to_dict(config)

    def manager(sub, keep):
      return ocp.CheckpointManager(
          epath.Path(self.workdir) / sub,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, enable_async_checkpointing=False, create=True,
              cleanup_tmp_directories=True,
              # Both managers may save the same step: their cross-process barriers
              # (named after the step) need distinct names.
              multiprocessing_options=ocp.options.MultiprocessingOptions(
                  barrier_sync_key_prefix=sub)),
          item_names=("state", "config", "digests"))

    self._managers = {CHECKPOINT_DIR: manager(CHECKPOINT_DIR, max(1, int(max_to_keep))),
                      SNAPSHOT_DIR: manager(SNAPSHOT_DIR, None)}
    # Several processes save on the main thread: orbax's cross-process barriers are
    # device collectives, which must not run beside the training step's collectives.
    async_save = async_save and jax.process_count() == 1
    self._executor = (concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="checkpoint_writer") if async_save else None)
    self._pending: concurrent.futures.Future | None = None
    self._failure: CheckpointWriteError | None = None
    self.restored_from: tuple[int, str] | None = None  # (step, directory) of `restore`
    write_failures.quiet_writer_errors()

  def latest_step(self) -> int | None:
    """Returns the newest step over both directories, or None."""
    steps = [m.latest_step() for m in self._managers.values()]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None

  # --- saving ----------------------------------------------------------------------

  def save(self, step: int, state: PyTree, *, snapshot: bool = False,
           preemption: bool = True) -> None:
    """Saves `state` at `step` (all processes must call this together).

    Waits for the previous save first (raising its failure, if any: a training loop of
    several processes checks `failed` on all of them together first, see
    `train._raise_failed_save`), then writes in the background (or here, without
    `async_save` or with several processes).

    Args:
      step: the state's step.
      state: the train state (replicated global arrays, or host arrays).
      snapshot: also keep it in snapshots/.
      preemption: save it in checkpoints/.

    Raises:
      CheckpointWriteError: this save (without `async_save`) or the previous one failed.
    """
    self.wait()
    subs = ([CHECKPOINT_DIR] if preemption else []) + ([SNAPSHOT_DIR] if snapshot else [])
    # The state is replicated: every process holds all of it. Writing a host copy skips
    # orbax's per-replica device slicing (which compiles per array shape) and lets the
    # next (donating) train step reuse the device buffers at once.
    host_state = jax.device_get(state)
    if self._executor is None:
      self._write(int(step), host_state, subs)
      self.wait()
    else:
      self._pending = self._executor.submit(self._write, int(step), host_state, subs)

  def _write(self, step: int, host_state: PyTree, subs: list[str]) -> None:
    """Writes every copy of one step (on the writer thread); keeps a failure for `check`."""
    done = []
    try:
      digests = digests_lib.tree_digests(host_state)
      for sub in subs:
        mngr = self._managers[sub]
        if step in mngr.all_steps():
          done.append(sub)  # already there
          continue
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host_state),
            config=ocp.args.JsonSave(self._config),
            digests=ocp.args.JsonSave(digests)), force=True)
        done.append(sub)
    except Exception as e:  # pylint: disable=broad-except
      self._failure = self._describe_failure(step, subs, done, e)
      return
    logging.info("Saved step %d (%s) in %s.", step,
                 ", ".join(f"{sub}/{step}" for sub in subs), self.workdir)

  def _describe_failure(self, step: int, subs: list[str], done: list[str],
                        error: BaseException) -> CheckpointWriteError:
    failed = next(sub for sub in subs if sub not in done)
    directory = os.path.join(self.workdir, failed, str(step))
    path, number, cause = write_failures.describe(error, directory)
    kept = [f"{sub}/{step}" for sub in done]
    newest = self._newest_committed(exclude=step)
    if newest is not None:
      kept.append(f"step {newest[0]} ({newest[1]}/{newest[0]})")
    errno_text = (f"[Errno {number}: {errno_lib.errorcode.get(number, number)}] "
                  if number else "")
    return write_failures.CheckpointWriteError(
        f"Saving the checkpoint of step {step} failed: writing {path}: "
        f"{errno_text}{cause}. Training stopped; kept: "
        f"{', '.join(kept) if kept else 'no checkpoint of this run yet'}. Free space (or "
        "fix the quota or permissions) and rerun the same command to resume.",
        number, path)

  def _newest_committed(self, exclude: int) -> tuple[int, str] | None:
    for step, sub in list_steps(self.workdir):
      if step != exclude:
        return step, sub
    return None

  def check(self) -> None:
    """Raises the failure of a background save, if one failed (once); never blocks."""
    if self._pending is not None and self._pending.done():
      self._pending = None
    if self._failure is not None:
      failure, self._failure = self._failure, None
      raise failure

  def failed(self) -> bool:
    """Whether a finished background save failed (without raising it)."""
    if self._pending is not None and self._pending.done():
      self._pending = None
    return self._failure is not None

  def wait(self, raise_failure: bool = True) -> None:
    """Blocks until the pending save is written; raises its failure, if any (unless
    `raise_failure` is False: then `failed` and `check` report it)."""
    if self._pending is not None:
      self._pending.result()
      self._pending = None
    if raise_failure:
      self.check()

  def close(self, raise_failure: bool = True) -> None:
    """Waits for the pending save and releases the managers.

    Args:
      raise_failure: raise a failed save not raised before (False: log it instead, for
        a caller that is already stopping on another error).
    """
    try:
      if self._pending is not None:
        concurrent.futures.wait([self._pending])
        self._pending = None
      if self._failure is not None and not raise_failure:
        logging.error("%s", self._failure)
        self._failure = None
      self.check()
    finally:
      if self._executor is not None:
        self._executor.shutdown(wait=True)
      for mngr in self._managers.values():
        mngr.close()

  # --- restoring -------------------------------------------------------------------

  def restore(self, abstract_state: PyTree, step: int | None = None
              ) -> tuple[PyTree | None, int | None]:
    """Restores the newest readable, intact checkpoint (or exactly `step`).

    A checkpoint that cannot be read or whose arrays differ from their saved digests is
    logged, moved to unreadable_checkpoints/ (process 0) and skipped in favour of the next
    older one (or the other copy of the same step).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with shardings (the restore target).
      step: a given step to restore; None for the newest.

    Returns:
      (state, step), or (None, None) when the workdir has no checkpoint.

    Raises:
      FileNotFoundError: `step` is given and no checkpoint has it.
      UnreadableCheckpoints: checkpoints exist but none could be read (nothing is moved
        aside then: a state of another structure, e.g. after a change of the optimizer
        settings, fails every candidate alike).
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
      state, problem = self._read_verified(sub, cand_step, abstract_state)
      if problem is not None:
        logging.error("Checkpoint %s/%d in %s is unusable: %s.", sub, cand_step,
                      self.workdir, problem)
        failures.append((cand_step, sub, problem))
        continue
      if failures:
        logging.warning("Falling back to checkpoint %s/%d after unusable checkpoint(s) %s.",
                        sub, cand_step, [f"{s}/{n}" for n, s, _ in failures])
        self._move_aside(failures)
      self.restored_from = (cand_step, sub)
      return state, cand_step
    raise UnreadableCheckpoints(
        f"No checkpoint in {self.workdir} could be read:\n" +
        "\n".join(f"  {sub}/{s}: {m}" for s, sub, m in failures) +
        "\nRefusing to start from scratch over them: move them away or use a new --workdir.")

  def _read_verified(self, sub: str, step: int, abstract_state: PyTree
                     ) -> tuple[PyTree | None, str | None]:
    """(state, None) if `sub/step` reads and matches its digests, else (None, why)."""
    has_digests = (epath.Path(self.workdir) / sub / str(step) / "digests").exists()
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if has_digests:
      items["digests"] = ocp.args.JsonRestore()
    try:
      restored = self._managers[sub].restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      return None, f"unreadable ({type(e).__name__}: {str(e)[:500]})"
    if not has_digests:
      logging.warning("Checkpoint %s/%d has no array digests (written by an older version "
                      "of diffusion_jax): restored without checking its arrays.", sub, step)
      return restored.state, None
    try:
      mismatch = digests_lib.first_mismatch(jax.device_get(restored.state),
                                            restored.digests)
    except ValueError as e:
      return None, f"its digests cannot be checked ({e})"
    if mismatch is not None:
      return None, (f"its arrays differ from what was saved (first mismatching array: "
                    f"{mismatch})")
    return restored.state, None

  def ensure_snapshot(self, step: int, state: PyTree, abstract_state: PyTree) -> bool:
    """Makes sure snapshots/<step> exists and is intact; writes it from `state` if not.

    For a run restored at a snapshot step: a kill between the step's two copies, or a
    damaged snapshot, would otherwise lose that snapshot for good. Waits for the write.

    Returns:
      True if the snapshot was (re)written.
    """
    path = epath.Path(self.workdir) / SNAPSHOT_DIR / str(step)
    if path.exists():
      _, problem = self._read_verified(SNAPSHOT_DIR, step, abstract_state)
      if problem is None:
        return False
      logging.error("Snapshot %s is unusable: %s.", path, problem)
      self._move_aside([(step, SNAPSHOT_DIR, problem)])
    logging.warning("Writing the missing snapshot of step %d again (from the restored "
                    "state).", step)
    self.save(step, state, snapshot=True, preemption=False)
    self.wait()
    return True

  def _move_aside(self, failures) -> None:
    """Moves unusable step directories to unreadable_checkpoints/ and reloads."""
    if jax.process_index() == 0:
      dest_root = epath.Path(self.workdir) / UNREADABLE_DIR
      dest_root.mkdir(parents=True, exist_ok=True)
      for step, sub, _ in failures:
        src = epath.Path(self.workdir) / sub / str(step)
        dest = dest_root / f"{sub}_{step}_{int(time.time())}"
        src.rename(dest)
        logging.warning("Moved unusable checkpoint %s to %s.", src, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointing_move_aside")
    for mngr in self._managers.values():
      mngr.reload()
