"""The paper's figures as PNG files under `<workdir>/figures/step<step>/`.

  python -m diffusion_jax.main --mode=figures --config configs/celebahq256.py --workdir DIR

* `samples.png`: a grid of samples 0..n-1 of the sample job (the configured sampler and
  the same keys, so the same images as `samples/` holds).
The other figures are the paper's, with its ancestral sampler over all T steps:
* `progressive_pred_x0.png`, `progressive_x_t.png` (Figs. 6 and 10): one row per example,
  the predicted x_0 (and the model input x_t) every T/10 steps, from x_T to the sample.
* `completions.png` (Fig. 7): one row per split time t in T * `eval.figure_t_fractions`:
  the shared latent x_t, then stochastic completions x_0 ~ p(x_0 | x_t).
* `interpolation.png` (Fig. 8): pairs of test images encoded to t = T/2 by q, mixed with
  lambda in [0, 1] and decoded; each row is x_a, the mixes, x_b.
* `interpolation_coarse_to_fine.png` (Fig. 9): one pair, one row per t in T *
  `eval.figure_t_fractions`.
A class-conditional network draws every figure of one class (the first of
`sampling.labels`; "balanced": class 0) with `sampling.guidance_scale`; the sample grid
follows `sampling.labels` per sample. Every program is one compiled sampler call; keys are
`fold_in(key(seed), streams.FIGURE)` folded with the row index. Settings (defaults): eval.figure_rows (4), eval.figure_columns
(8), eval.figure_t_fractions ((1.0, 0.75, 0.5, 0.25)), eval.figure_num_images (64).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import image_grid
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.diffusion import samplers
from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import restore
from diffusion_jax.evaluation import results

FIGURES_DIR = "figures"


def _settings(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  e = config.eval
  fractions = tuple(float(f) for f in e.get("figure_t_fractions", (1.0, 0.75, 0.5, 0.25)))
  if not fractions or any(not 0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"eval.figure_t_fractions must be in (0, 1], got {fractions}.")
  return {"rows": int(e.get("figure_rows", 4)), "columns": int(e.get("figure_columns", 8)),
          "fractions": fractions, "num_images": int(e.get("figure_num_images", 64))}


def _replicated_jit(fn, eval_model: restore.EvalModel):
  return jax.jit(fn, out_shardings=sharding.replicated(eval_model.mesh),
                 compiler_options=eval_model.jit_options())


def _host(tree):
  return jax.tree_util.tree_map(sharding.replicated_value, tree)


def _save(directory: str, name: str, images: np.ndarray, columns: int) -> str:
  path = os.path.join(directory, name)
  if results.is_writer():
    image_grid.save_png(path, image_grid.make_grid(np.asarray(images), num_cols=columns))
  return path


def _timestep(num_timesteps: int, fraction: float) -> int:
  return max(0, min(num_timesteps - 1, int(round(fraction * num_timesteps)) - 1))


def make_figures(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Writes every figure for the checkpoint `config.eval` selects; returns the summary."""
  settings = _settings(config)
  eval_model = restore.load_eval_model(config, workdir)
  mesh, schedule = eval_model.mesh, eval_model.schedule
  d, s = config.diffusion, config.sampling
  num_t = int(d.num_timesteps)
  shape = (int(config.data.image_size),) * 2 + (int(config.data.channels),)
  kwargs = dict(model_mean_type=d.model_mean_type, model_var_type=d.model_var_type,
                clip_denoised=bool(s.clip_denoised))
  base = streams.stream_key(config.seed, streams.FIGURE)
  rows, cols = settings["rows"], settings["columns"]
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(rows))  # [rows]
  directory = os.path.join(workdir, FIGURES_DIR, f"step{eval_model.step}")
  params = eval_model.params
  # A class-conditional network draws the figures of one class: the first of
  # sampling.labels ("balanced": class 0), with the configured guidance.
  label = None
  if sampling.num_classes(config):
    classes = sampling.label_list(config)
    label = 0 if classes is None else int(classes[0])
  model_fn = lambda p: eval_model.model_fn(
      p, label, float(config.sampling.get("guidance_scale", 1.0)))
  files: Dict[str, str] = {}

  # Sample grid: samples 0..n-1 of the sample job.
  variances, _ = analytic_job.sampler_variances(config, workdir, eval_model.step,
                                                eval_model.params_kind)
  sample_fn = sampling.make_sample_fn(eval_model.model, schedule, config, mesh,
                                      eval_model.jit_options(), variances)
  grid = sampling.sample_indices(sample_fn, params, np.arange(settings["num_images"]), mesh)
  files["samples"] = _save(directory, "samples.png", grid, cols)

  # Progressive generation (Figs. 6, 10).
  every = max(1, num_t // 10)
  prog = _replicated_jit(lambda p, k: samplers.progressive_sample(
      model_fn(p), schedule, k, shape, every=every, **kwargs), eval_model)(params, keys)
  prog = _host({k: v for k, v in prog.items() if k != "timesteps"})
  per_row = prog["pred_xstart"].shape[1]
  files["progressive_pred_x0"] = _save(directory, "progressive_pred_x0.png",
                                       prog["pred_xstart"].reshape((-1,) + shape), per_row)
  files["progressive_x_t"] = _save(directory, "progressive_x_t.png",
                                   np.clip(prog["x_t"], -1, 1).reshape((-1,) + shape), per_row)

  # Stochastic completions from shared latents (Fig. 7).
  rows_out: List[np.ndarray] = []
  for fraction in settings["fractions"]:
    t_split = _timestep(num_t, fraction)
    out = _replicated_jit(lambda p, k, t=t_split: samplers.sample_completions(
        model_fn(p), schedule, k, shape, t_split=t, num_completions=cols - 1, **kwargs),
                          eval_model)(params, keys[:1])
    out = _host(out)
    rows_out.append(np.concatenate([np.clip(out["x_t"], -1, 1), out["samples"][0]]))
  files["completions"] = _save(directory, "completions.png", np.concatenate(rows_out), cols)

  # Interpolations (Figs. 8, 9) between test images.
  pairs = _test_images(config, 2 * rows)
  x_a, x_b = pairs[0::2], pairs[1::2]
  lambdas = jnp.linspace(0.0, 1.0, cols - 2)

  def interp(t, xa, xb, k):
    fn = lambda p, xa, xb, k: samplers.interpolate(model_fn(p), schedule, xa, xb, k, t=t,
                                                   lambdas=lambdas, **kwargs)["samples"]
    mixes = _host(_replicated_jit(fn, eval_model)(params, xa, xb, k))  # [B, L, H, W, C]
    return np.concatenate([xa[:, None], mixes, xb[:, None]], axis=1).reshape((-1,) + shape)

  files["interpolation"] = _save(directory, "interpolation.png",
                                 interp(_timestep(num_t, 0.5), x_a, x_b, keys), cols)
  coarse = [interp(_timestep(num_t, f), x_a[:1], x_b[:1], keys[:1])
            for f in settings["fractions"]]
  files["interpolation_coarse_to_fine"] = _save(
      directory, "interpolation_coarse_to_fine.png", np.concatenate(coarse), cols)
  summary = {"checkpoint_step": eval_model.step, "params": eval_model.params_kind,
             "files": files, "t_fractions": list(settings["fractions"]),
             **sampling.settings(config)}
  summary["summary_json"] = results.write_summary(workdir, "figures", eval_model.step,
                                                  summary)
  return summary


def _test_images(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """The first `count` images of `data.eval_split` as float32 [-1, 1] (host arrays)."""
  ds, available = input_pipeline.eval_dataset(
      config.data, config.data.eval_split, global_batch_size=count, rows=np.arange(count))
  if available < count:
    raise ValueError(f"The interpolation figures need {count} images of "
                     f"{config.data.eval_split}; it holds {available}.")
  images, _ = next(ds.as_numpy_iterator())
  return input_pipeline.PIXEL_VALUES[images[:count]]
