"""The model an evaluation job uses: parameters restored from a workdir's checkpoint.

Any workdir with a checkpoint works, including one written by the checkpoint importer.
The EMA parameters are used by default (`config.eval.use_ema`), from the newest
checkpoint or the step `config.eval.checkpoint_step`. Nothing in the workdir is written
when it holds no checkpoint or one of another architecture.

Random streams of the evaluation jobs (folded into `jax.random.key(config.seed)`, then
with the image index): distinct from the training streams of `run_setup`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh
import ml_collections

from diffusion_jax import checkpointing
from diffusion_jax import run_setup
from diffusion_jax import sharding
from diffusion_jax.schedules import Schedule

PyTree = Any
BPD_STREAM = 10  # fold_in(key(seed), 10), then the image index in the split.
SAMPLE_STREAM = 11  # fold_in(key(seed), 11), then the sample index.
FIGURE_STREAM = 12  # fold_in(key(seed), 12), then the figure row.


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A restored model ready for evaluation.

  Attributes:
    params: the parameters used (EMA by default), replicated over `mesh`.
    step: the checkpoint's step.
    params_kind: "ema" or "params".
    model: the U-Net module.
    schedule: the diffusion coefficients.
    mesh: the data-parallel mesh over all devices.
  """
  params: PyTree
  step: int
  params_kind: str
  model: Any
  schedule: Schedule
  mesh: Mesh

  def model_fn(self, params: PyTree) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns `model_fn(x_t, t)` of `params` (deterministic: no dropout)."""
    return lambda x, t: self.model.apply({"params": params}, x, t, train=False)


def stream_key(config: ml_collections.ConfigDict, stream: int) -> jax.Array:
  """The base key of an evaluation stream (`fold_in(key(seed), stream)`)."""
  return run_setup.stream_key(config, stream)


def load_eval_model(config: ml_collections.ConfigDict, workdir: str,
                    mesh: Mesh | None = None) -> EvalModel:
  """Restores the checkpoint that `config.eval` selects from `workdir`.

  Raises:
    FileNotFoundError: the workdir has no checkpoint (or not the requested step).
    ValueError: the checkpoint's architecture differs from `config`.
  """
  mesh = sharding.make_mesh() if mesh is None else mesh
  use_ema = bool(config.eval.use_ema)
  params, step = checkpointing.load_eval_params(
      workdir, config, use_ema=use_ema, step=int(config.eval.checkpoint_step), mesh=mesh)
  _, model = run_setup.build_model(config)
  return EvalModel(params=params, step=step, params_kind="ema" if use_ema else "params",
                   model=model, schedule=run_setup.build_schedule(config), mesh=mesh)
