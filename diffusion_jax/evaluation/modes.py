"""The evaluation jobs of `python -m diffusion_jax.main --mode=...` (name -> job(config, workdir)).

  eval_bpd   bits/dim of `eval.bpd_split` (all T terms, chunked, resumable), Table 4, Fig. 5
  eval_analytic  Analytic-DPM's Gamma_t (for `eval.bpd_analytic`), chunked, resumable
  sample     `sampling.num_samples` samples in resumable uint8 shards
  eval_fid   the sample job, then FID (and IS) with the JAX Inception
  figures    sample grid, progressive generation, completions, interpolations
  invert     DDIM inversion of images to latents x_T and their reconstructions
  inpaint    RePaint completions of masked images (any trained model)
Each job works on any workdir with a checkpoint (EMA parameters by default) and writes a
JSON summary under `<workdir>/eval/`.
"""

from diffusion_jax.evaluation import analytic_job
from diffusion_jax.evaluation import bpd_job
from diffusion_jax.evaluation import fid_job
from diffusion_jax.evaluation import figures
from diffusion_jax.evaluation import inpaint_job
from diffusion_jax.evaluation import invert_job
from diffusion_jax.evaluation import sample_job

MODES = {
    "eval_bpd": bpd_job.evaluate_bpd,
    "eval_analytic": analytic_job.estimate_gamma,
    "sample": sample_job.generate_samples,
    "eval_fid": fid_job.evaluate_fid,
    "figures": figures.make_figures,
    "invert": invert_job.invert_images,
    "inpaint": inpaint_job.inpaint_images,
}
