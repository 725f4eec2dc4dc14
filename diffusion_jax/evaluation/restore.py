"""The model an evaluation job uses: parameters restored from a workdir's checkpoint.

Any workdir with a checkpoint works, including one written by the checkpoint importer.
The EMA parameters are used by default (`config.eval.use_ema`), from the newest
checkpoint or the step `config.eval.checkpoint_step`. Nothing in the workdir is written
when it holds no checkpoint or one of another architecture. `load_eval_model` runs the
job's one validation pass (`validation.validate_config`) and resolves the kernel policy
before restoring anything.

Random streams of the evaluation jobs: `diffusion_jax.streams`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections

from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax import validation
from diffusion_jax.diffusion import guidance
from diffusion_jax.diffusion.schedules import Schedule
from diffusion_jax.training import params_checkpoint
from diffusion_jax.training import run_setup

PyTree = Any


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A restored model ready for evaluation.

  Attributes:
    params: the parameters used (EMA by default), replicated over `mesh`.
    step: the checkpoint's step.
    params_kind: "ema" or "params".
    model: the U-Net module (computing with `ops`).
    schedule: the diffusion coefficients.
    mesh: the data-parallel mesh over all devices.
    ops: the network's operations (the kernel policy's choice for `mesh`).
  """
  params: PyTree
  step: int
  params_kind: str
  model: Any
  schedule: Schedule
  mesh: Mesh
  ops: ops_lib.Ops

  def model_fn(self, params: PyTree, label: int | None = None, guidance_scale: float = 1.0
               ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns `model_fn(x_t, t)` of `params` (deterministic: no dropout).

    For a class-conditional network every example gets `label` (None: the null class,
    i.e. the unconditional model), with classifier-free guidance `guidance_scale`.
    """
    classes = getattr(getattr(self.model, "config", None), "num_classes", 0)
    if not classes:
      return lambda x, t: self.model.apply({"params": params}, x, t, train=False)
    apply = lambda x, t, y: self.model.apply({"params": params}, x, t, train=False, y=y)
    value = classes if label is None else int(label)

    def model_fn(x, t):
      labels = jnp.full((x.shape[0],), value, jnp.int32)
      return guidance.guided_model_fn(apply, labels, classes, guidance_scale,
                                      self.model.config.in_channels)(x, t)

    return model_fn

  def jit_options(self) -> dict | None:
    """Compiler options of the job's programs (`Ops.jit_options`)."""
    return self.ops.jit_options()


def load_eval_model(config: ml_collections.ConfigDict, workdir: str,
                    mesh: Mesh | None = None) -> EvalModel:
  """Validates the config and restores the checkpoint that `config.eval` selects.

  Raises:
    ValueError: bad settings, or the checkpoint's architecture differs from `config`.
    FileNotFoundError: the workdir has no checkpoint (or not the requested step).
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  validation.validate_config(config, mesh, training=False)
  ops = run_setup.build_ops(config, mesh)
  logging.info("model.kernels=%s: %s.", config.model.get("kernels", "auto"), ops.description)
  use_ema = bool(config.eval.use_ema)
  params, step = params_checkpoint.load_eval_params(
      workdir, config, use_ema=use_ema, step=int(config.eval.checkpoint_step), mesh=mesh)
  return EvalModel(params=params, step=step, params_kind="ema" if use_ema else "params",
                   model=run_setup.build_model(config, ops),
                   schedule=run_setup.build_schedule(config), mesh=mesh, ops=ops)
