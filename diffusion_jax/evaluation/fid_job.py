r"""FID, KID, IS and precision/recall job: samples -> JAX Inception features -> metrics
against the train and test references in one run.

  python -m diffusion_jax.main --mode=eval_fid --config configs/cifar10.py --workdir DIR \
      --config.eval.inception_weights=inception_fid.npz \
      [--config.eval.fid_reference=cifar10_train_stats.npz]

Runs (or completes) the sampling job first, so it resumes like it. The references and
the protocol are those of `sample_quality`: by default FID and KID against both the
training set (the paper's FID) and the test set, each computed once from the data and
cached under `eval/` with its origin (or read from `eval.fid_reference` /
`eval.fid_test_reference`). The statistics of the samples (`fid_stats.npz`) and their
pool3 features (`inception_features.npz`, for other metrics later) are kept next to them.
The Inception Score is computed when the weights include the classifier, and reported
as unavailable (with the reason) otherwise. `eval.fid_method` picks the matrix square root
("sqrtm", TTUR's, by default; or "eigh", see `fid.frechet_distance`). One JSON summary
names the checkpoint step, sampler, number of samples, references' origins and
Inception weights.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from absl import logging
import ml_collections

from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_score
from diffusion_jax.evaluation import results
from diffusion_jax.evaluation import sample_job
from diffusion_jax.evaluation import sample_quality


_IS_SPLITS = 10  # As the OpenAI Inception Score code.


def evaluate_fid(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Samples (resuming), then FID/KID/IS/precision/recall; writes and returns the
  summary."""
  sample_quality.check_inputs(config)  # before any sampling
  samples = sample_job.generate_samples(config, workdir)
  quality = sample_quality.SampleQuality(config, workdir)
  num = samples["num_samples"]
  out = quality.extractor(sample_job.iterate_samples(samples["directory"], num),
                          log_every=10)
  mu, sigma = fid.feature_statistics(out["pool3"])
  if results.is_writer():
    fid.save_statistics(os.path.join(samples["directory"], "fid_stats.npz"), mu, sigma,
                        {"origin": samples["directory"], "num_images": num,
                         "inception": quality.inception_source})
    results.save_npz_atomic(os.path.join(samples["directory"], "inception_features.npz"),
                            pool3=out["pool3"].astype("float32"))
  samples = {("samples_summary_json" if k == "summary_json" else k): v
             for k, v in samples.items()}
  summary: Dict[str, Any] = {**samples, **quality.metrics(out["pool3"])}
  if "logits" in out and num >= _IS_SPLITS:
    summary["inception_score"], summary["inception_score_std"] = (
        inception_score.inception_score_from_outputs(out, splits=_IS_SPLITS))
  elif "logits" in out:
    summary["inception_score"] = None
    summary["inception_score_note"] = (f"the Inception Score is computed over {_IS_SPLITS} "
                                       f"splits and needs at least {_IS_SPLITS} samples")
  else:
    summary["inception_score"] = None
    summary["inception_score_note"] = ("the Inception weights have no 1008-way classifier; "
                                       "convert pytorch-fid's pt_inception file for IS")
  # One summary per sample set: `fid_<sampler tag>_step<step>.json`, as the samples'.
  set_tag = os.path.basename(samples["directory"]).split("_", 1)[1]
  summary["summary_json"] = results.write_summary(workdir, f"fid_{set_tag}",
                                                  samples["checkpoint_step"], summary)
  for role in quality.references:
    suffix = "" if role == "train" else f"_{role}"
    logging.info("FID %.4f, KID %s against %s (%d samples)", summary[f"fid{suffix}"],
                 summary.get(f"kid{suffix}"), summary[f"fid{suffix}_reference"]["origin"],
                 num)
  return summary
