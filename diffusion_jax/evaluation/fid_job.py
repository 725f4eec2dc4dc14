"""FID (and IS) job: sample set -> JAX Inception features -> FID against reference statistics.

  python -m diffusion_jax.main --mode=eval_fid --config configs/cifar10.py --workdir DIR \
      --config.eval.inception_weights=inception_fid.npz \
      [--config.eval.fid_reference=cifar10_train_stats.npz]

Runs (or completes) the sampling job first, so it resumes like it. The reference is
`eval.fid_reference` (a statistics .npz: ours, TTUR's or pytorch-fid's), or else computed
from the whole `data.train_split` (the paper's FID is against the training set) and cached
under `eval/` with its origin. The statistics of the samples are kept next to them. The
Inception Score is computed when the weights include the classifier, and reported as
unavailable (with the reason) otherwise. `eval.fid_method` picks the matrix square root
("sqrtm", TTUR's, by default; or "eigh", see `fid.frechet_distance`). One JSON summary names the checkpoint step,
sampler, number of samples, reference origin and Inception weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Tuple

from absl import logging
import ml_collections
import numpy as np

from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_score
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.evaluation import results
from diffusion_jax.evaluation import sample_job


_IS_SPLITS = 10  # As the OpenAI Inception Score code.


def _check_inputs(config: ml_collections.ConfigDict) -> str:
  """Fails before any sampling when the Inception weights or the reference are missing."""
  weights = config.eval.inception_weights
  if not weights or not os.path.isfile(weights):
    raise FileNotFoundError(
        f"eval.inception_weights={weights!r} is not a file. Convert the FID Inception once "
        "with `python -m diffusion_jax.tools.convert_inception --out inception_fid.npz` "
        "and pass --config.eval.inception_weights=inception_fid.npz.")
  reference = config.eval.fid_reference
  if reference:
    fid.load_statistics(reference)  # raises with the reason
  return weights


def dataset_statistics(config: ml_collections.ConfigDict,
                       extractor: features_lib.InceptionFeatures, inception_source: str,
                       cache_dir: str) -> Tuple[np.ndarray, np.ndarray, Dict[str, str]]:
  """Statistics of the whole `data.train_split`, cached in `cache_dir` by origin.

  Every process reads the whole split (in its stored order) and computes the same
  statistics; only process 0 writes the cache.
  """
  data = config.data
  origin = {"dataset": data.dataset, "split": data.train_split,
            "image_size": int(data.image_size), "channels": int(data.channels),
            "path": data.path, "inception": inception_source}
  digest = hashlib.sha1(json.dumps(origin, sort_keys=True).encode()).hexdigest()[:10]
  path = os.path.join(cache_dir, f"fid_reference_{digest}.npz")
  if os.path.exists(path):
    mu, sigma, meta = fid.load_statistics(path, with_metadata=True)
    return mu, sigma, meta
  ds, count = input_pipeline.eval_dataset(
      data, data.train_split, global_batch_size=extractor.batch_size,
      rows=np.arange(extractor.batch_size))
  batches = (images[mask] for images, mask in ds.as_numpy_iterator())
  logging.info("FID reference: Inception features of %d images of %s/%s", count,
               data.dataset, data.train_split)
  pool3 = extractor(batches, log_every=10)["pool3"]
  mu, sigma = fid.feature_statistics(pool3)
  meta = {**{k: str(v) for k, v in origin.items()}, "num_images": str(pool3.shape[0])}
  if results.is_writer():
    fid.save_statistics(path, mu, sigma, meta)
  return mu, sigma, meta


def evaluate_fid(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Samples (resuming), then FID/IS of the samples; returns and writes the summary."""
  weights = _check_inputs(config)
  samples = sample_job.generate_samples(config, workdir)
  params, has_logits, meta = inception_weights.load_weights(weights)
  extractor = features_lib.InceptionFeatures(
      params, with_logits=has_logits, batch_size=int(config.eval.fid_batch_size),
      jit_options=ops_lib.from_config(config, sharding.make_mesh()).jit_options())
  inception_source = meta.get("source", "")
  num = samples["num_samples"]
  out = extractor(sample_job.iterate_samples(samples["directory"], num), log_every=10)
  mu, sigma = fid.feature_statistics(out["pool3"])
  if results.is_writer():
    fid.save_statistics(os.path.join(samples["directory"], "fid_stats.npz"), mu, sigma,
                        {"origin": samples["directory"], "num_images": num,
                         "inception": inception_source})
  if config.eval.fid_reference:
    ref_mu, ref_sigma, ref_meta = fid.load_statistics(config.eval.fid_reference,
                                                      with_metadata=True)
    reference = {"origin": os.path.abspath(config.eval.fid_reference), **ref_meta}
  else:
    ref_mu, ref_sigma, ref_meta = dataset_statistics(
        config, extractor, inception_source, os.path.join(workdir, results.EVAL_DIR))
    reference = {"origin": f"{config.data.dataset}:{config.data.train_split}", **ref_meta}
  samples = {("samples_summary_json" if k == "summary_json" else k): v
             for k, v in samples.items()}
  summary: Dict[str, Any] = {
      **samples, "fid": fid.frechet_distance(mu, sigma, ref_mu, ref_sigma,
                                             method=config.eval.get("fid_method", "sqrtm")),
      "fid_reference": reference, "inception_weights": inception_source}
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
  summary["summary_json"] = results.write_summary(workdir, "fid", samples["checkpoint_step"],
                                                  summary)
  logging.info("FID %.4f against %s (%d samples)", summary["fid"], reference["origin"], num)
  return summary
