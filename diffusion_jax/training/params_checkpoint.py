"""Parameters in and out of train-state checkpoints: imported weights written as a
checkpoint, and the (EMA) parameters of a checkpoint loaded for evaluation or export."""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import jax
import ml_collections
import numpy as np

from diffusion_jax import sharding
from diffusion_jax.training import checkpointing
from diffusion_jax.training import run_setup
from diffusion_jax.training import train_state as train_state_lib

PyTree = Any


def write_params_checkpoint(workdir: str, config: ml_collections.ConfigDict, params: PyTree,
                            *, ema_params: PyTree | None = None, step: int = 0) -> str:
  """Writes parameters as a full train-state checkpoint (fresh optimizer state).

  For imported weights: `train_and_evaluate` resumes from it and the evaluation jobs read
  it like any training checkpoint. It goes to snapshots/ (kept).

  Args:
    workdir: the run directory; must not hold a checkpoint yet.
    config: the config whose architecture `params` has (saved with the checkpoint).
    params: the U-Net parameters (host or device arrays).
    ema_params: EMA parameters; None uses a copy of `params`.
    step: the step to record (e.g. the step of the imported checkpoint).

  Returns:
    The directory of the written checkpoint.

  Raises:
    FileExistsError: the workdir already holds a checkpoint (nothing is overwritten).
    ValueError: the parameters do not have the config's architecture.
  """
  workdir = checkpointing.resolve_workdir(workdir)
  existing = checkpointing.list_steps(workdir)
  if existing:
    raise FileExistsError(
        f"{workdir} already holds checkpoints at steps {sorted({s for s, _ in existing})}; "
        "refusing to overwrite them. Use a new workdir.")
  mesh = sharding.make_mesh(jax.devices()[:1])
  abstract = run_setup.abstract_train_state(config, mesh)
  for name, tree in (("params", params), ("ema_params", ema_params)):
    if tree is None:
      continue
    want = jax.tree_util.tree_map(lambda x: (tuple(x.shape), x.dtype), abstract.params)
    got = jax.tree_util.tree_map(lambda x: (tuple(np.shape(x)), np.asarray(x).dtype), tree)
    if got != want:
      raise ValueError(
          f"{name} do not match the architecture of the config (model.*, data.image_size, "
          "data.channels, diffusion.model_var_type): compare the parameter tree's shapes "
          "with models.param_shapes(models.unet_config_from(config)).")
  state = train_state_lib.create_train_state(
      jax.tree_util.tree_map(jax.numpy.asarray, params), run_setup.build_optimizer(config),
      ema_params=ema_params, step=int(step))
  checkpointer = checkpointing.Checkpointer(workdir, config, async_save=False)
  try:
    checkpointer.save(int(step), state, snapshot=True, preemption=False)
  finally:
    checkpointer.close()
  checkpointing.write_config(workdir, config)
  return os.fspath(epath.Path(workdir) / checkpointing.SNAPSHOT_DIR / str(int(step)))


def load_eval_params(workdir: str, config: ml_collections.ConfigDict, *,
                     use_ema: bool = True, step: int = -1,
                     mesh: jax.sharding.Mesh | None = None) -> tuple[PyTree, int]:
  """Returns (parameters, step) of a checkpoint, replicated over `mesh`.

  Args:
    workdir: a run directory (training or `write_params_checkpoint`).
    config: the config; its architecture must match the checkpoint's.
    use_ema: the EMA parameters (default, as the paper evaluates) or the raw ones.
    step: the checkpoint step; -1 for the newest readable one.
    mesh: default all devices.

  Raises:
    FileNotFoundError: no checkpoint (or none at `step`).
    ValueError: the checkpoint has another architecture.
  """
  workdir = checkpointing.resolve_workdir(workdir)
  if not checkpointing.list_steps(workdir):
    raise FileNotFoundError(f"No checkpoint in {workdir} ({checkpointing.CHECKPOINT_DIR}/ or "
                            f"{checkpointing.SNAPSHOT_DIR}/).")
  checkpointing.check_architecture(workdir, config)
  mesh = sharding.make_mesh() if mesh is None else mesh
  checkpointer = checkpointing.Checkpointer(workdir, config, async_save=False)
  try:
    state, found = checkpointer.restore(run_setup.abstract_train_state(config, mesh),
                                        None if step < 0 else int(step))
  finally:
    checkpointer.close()
  return (state.ema_params if use_ema else state.params), int(found)
