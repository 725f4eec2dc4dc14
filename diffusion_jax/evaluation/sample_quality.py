"""FID, KID and precision/recall of sample features against reference sets computed once.

The protocol, which removes the usual ways FID stops being comparable:
  * one Inception network, the TF `inception-2015-12-05` FID graph (converted weights,
    `eval.inception_weights`), TF1 bilinear resize, pool3 features (see `features`);
  * references by role: "train" (the paper's FID 3.17 is against the training set) and
    "test" (5.24 for the same samples), each either a file (`eval.fid_reference`,
    `eval.fid_test_reference`: statistics, and `features` if KID and precision/recall are
    wanted) or computed from the first `eval.fid_reference_num_images` images of
    `data.train_split` / `data.eval_split` (-1: all) and cached under `<workdir>/eval/`
    with their origin, so training evaluations never recompute them;
  * FID in float64 (TTUR's numerics), KID with 100 subsets of 1000 (`kid`), improved
    precision/recall (k = 3) against the train reference on at most
    `eval.pr_num_images` features of each set; the number of samples is reported, since
    FID is biased upwards at small sizes (50,000 samples in the papers).

`SampleQuality(config, workdir)` is built once (it loads the network and the references)
and `evaluate(images)` / `metrics(features)` return the numbers: the FID job uses it, and
so can a training loop (FID during training).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, NamedTuple, Optional

from absl import logging
import ml_collections
import numpy as np

from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax import streams
from diffusion_jax.data import input_pipeline
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.evaluation import kid
from diffusion_jax.evaluation import precision_recall
from diffusion_jax.evaluation import results

ROLES = ("train", "test")


class Reference(NamedTuple):
  """A reference set: statistics, features (or None) and where they come from."""
  mu: np.ndarray  # [D]
  sigma: np.ndarray  # [D, D]
  features: Optional[np.ndarray]  # [N, D] float32, or None (a statistics-only file)
  meta: Dict[str, str]


def roles(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The configured reference roles, checked."""
  chosen = tuple(config.eval.get("fid_references", ("train",)))
  if not chosen or any(r not in ROLES for r in chosen) or len(set(chosen)) != len(chosen):
    raise ValueError(f"eval.fid_references={chosen!r} must list distinct roles among "
                     f"{ROLES}, e.g. --config.eval.fid_references='(\"train\", \"test\")'.")
  return chosen


def reference_file(config: ml_collections.ConfigDict, role: str) -> str:
  """The file configured for a role ("" = compute from the data)."""
  return config.eval.fid_reference if role == "train" else config.eval.fid_test_reference


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Fails in seconds when the weights, a reference file or a setting is wrong."""
  weights = config.eval.inception_weights
  if not weights or not os.path.isfile(weights):
    raise FileNotFoundError(
        f"eval.inception_weights={weights!r} is not a file. Convert the FID Inception once "
        "with `python -m diffusion_jax.tools.convert_inception --out inception_fid.npz` "
        "and pass --config.eval.inception_weights=inception_fid.npz.")
  for role in roles(config):
    if reference_file(config, role):
      fid.load_statistics(reference_file(config, role))  # raises with the reason
  subsets = int(config.eval.get("kid_subsets", kid.NUM_SUBSETS))
  size = int(config.eval.get("kid_subset_size", kid.SUBSET_SIZE))
  if subsets < 1 or size < 2:
    raise ValueError(f"eval.kid_subsets={subsets} and eval.kid_subset_size={size}: KID "
                     "needs at least one subset of at least 2 images.")


def _split_of(config: ml_collections.ConfigDict, role: str) -> str:
  return config.data.train_split if role == "train" else config.data.eval_split


def load_reference(config: ml_collections.ConfigDict, role: str,
                   extractor: features_lib.InceptionFeatures, inception_source: str,
                   cache_dir: str) -> Reference:
  """The reference of `role`: the configured file, or the split's features (cached).

  The cache `fid_reference_<digest>.npz` (digest of the origin: dataset, split, size,
  path, Inception source, number of images) holds mu, sigma, the features and the origin;
  every process computes the same values, process 0 writes.
  """
  path = reference_file(config, role)
  if path:
    mu, sigma, meta = fid.load_statistics(path, with_metadata=True)
    with np.load(path, allow_pickle=False) as data:
      feats = data["features"] if "features" in data.files else None
    return Reference(mu, sigma, feats, {"origin": os.path.abspath(path), **meta})
  data = config.data
  split = _split_of(config, role)
  num = int(config.eval.get("fid_reference_num_images", -1))
  origin = {"dataset": data.dataset, "split": split, "image_size": int(data.image_size),
            "channels": int(data.channels), "path": data.path,
            "inception": inception_source}
  if num > 0:
    origin["num_images"] = num
  digest = hashlib.sha1(json.dumps(origin, sort_keys=True).encode()).hexdigest()[:10]
  cache = os.path.join(cache_dir, f"fid_reference_{digest}.npz")
  if os.path.exists(cache):
    with np.load(cache, allow_pickle=False) as stored:
      has_features = "features" in stored.files
    if has_features:
      mu, sigma, meta = fid.load_statistics(cache, with_metadata=True)
      with np.load(cache, allow_pickle=False) as stored:
        feats = stored["features"]
      return Reference(mu, sigma, feats, {**meta, "origin": f"{data.dataset}:{split}",
                                          "cache": cache})
  ds, count = input_pipeline.eval_dataset(
      data, split, global_batch_size=extractor.batch_size,
      rows=np.arange(extractor.batch_size), num_images=num)
  batches = (images[mask] for images, mask in ds.as_numpy_iterator())
  logging.info("FID reference (%s): Inception features of %d images of %s/%s", role, count,
               data.dataset, split)
  pool3 = extractor(batches, log_every=10)["pool3"]
  mu, sigma = fid.feature_statistics(pool3)
  meta = {**{k: str(v) for k, v in origin.items()}, "num_images": str(pool3.shape[0])}
  if results.is_writer():
    arrays = {"mu": mu, "sigma": sigma, "features": pool3.astype(np.float32),
              **{f"meta/{k}": np.array(v) for k, v in meta.items()}}
    results.save_npz_atomic(cache, **arrays)
  return Reference(mu, sigma, pool3, {**meta, "origin": f"{data.dataset}:{split}",
                                      "cache": cache})


def make_extractor(config: ml_collections.ConfigDict
                   ) -> tuple[features_lib.InceptionFeatures, str]:
  """The sharded Inception network of `eval.inception_weights` and its source string."""
  params, has_logits, meta = inception_weights.load_weights(config.eval.inception_weights)
  extractor = features_lib.InceptionFeatures(
      params, with_logits=has_logits, batch_size=int(config.eval.fid_batch_size),
      jit_options=ops_lib.from_config(config, sharding.make_mesh()).jit_options())
  return extractor, meta.get("source", "")


class SampleQuality:
  """FID/KID (and precision/recall) against the configured references, loaded once.

  Example (a training loop's evaluation):
    quality = SampleQuality(config, workdir)   # once: network + cached references
    metrics = quality.evaluate(images_uint8)   # every evaluation: {'fid': ..., ...}
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               extractor: Optional[features_lib.InceptionFeatures] = None,
               inception_source: str = ""):
    check_inputs(config)
    self.config = config
    if extractor is None:
      extractor, inception_source = make_extractor(config)
    self.extractor = extractor
    self.inception_source = inception_source
    cache_dir = os.path.join(workdir, results.EVAL_DIR)
    self.references = {role: load_reference(config, role, extractor, inception_source,
                                             cache_dir) for role in roles(config)}

  def evaluate(self, images: Any) -> Dict[str, Any]:
    """Metrics of images ([N, H, W, C] in [0, 255], or an iterable of batches)."""
    return self.metrics(self.extractor(images)["pool3"])

  def metrics(self, features: np.ndarray) -> Dict[str, Any]:
    """Metrics of pool3 features [N, 2048]: per role `fid`, `kid`, `kid_std` (keys for
    "train"; `fid_test`, `kid_test`, ... for "test"), the references' origins, and
    `precision`/`recall` against the train reference (or the first with features)."""
    e = self.config.eval
    features = np.asarray(features)
    mu, sigma = fid.feature_statistics(features)
    out: Dict[str, Any] = {"num_samples": int(features.shape[0]),
                           "inception_weights": self.inception_source}
    seed = [int(self.config.seed), streams.KID]
    for role, ref in self.references.items():
      suffix = "" if role == "train" else f"_{role}"
      out[f"fid{suffix}"] = fid.frechet_distance(mu, sigma, ref.mu, ref.sigma,
                                                 method=e.get("fid_method", "sqrtm"))
      out[f"fid{suffix}_reference"] = ref.meta
      if ref.features is None:
        out[f"kid{suffix}"] = None
        out[f"kid{suffix}_note"] = ("the reference file has statistics only; KID needs its "
                                    "features (leave the file setting empty to compute "
                                    "them from the data)")
        continue
      k = kid.kernel_inception_distance(features, ref.features,
                                        num_subsets=int(e.get("kid_subsets", 100)),
                                        subset_size=int(e.get("kid_subset_size", 1000)),
                                        seed=seed)
      out[f"kid{suffix}"], out[f"kid{suffix}_std"] = k["kid"], k["kid_std"]
      out["kid_subsets"], out["kid_subset_size"] = k["kid_subsets"], k["kid_subset_size"]
    out.update(self._precision_recall(features))
    return out

  def _precision_recall(self, features: np.ndarray) -> Dict[str, Any]:
    num = int(self.config.eval.get("pr_num_images", 10_000))
    with_features = [(r, ref) for r, ref in self.references.items()
                     if ref.features is not None]
    if num <= 0 or not with_features:
      return {}
    role, ref = with_features[0]
    real, fake = ref.features[:num], features[:num]
    if min(real.shape[0], fake.shape[0]) <= 3:
      return {"precision": None, "precision_note": "precision/recall need more than "
                                                   "k = 3 images in each set"}
    pr = precision_recall.precision_recall(real, fake, k=3)
    return {"precision": pr["precision"], "recall": pr["recall"],
            "precision_recall_reference": role,
            "precision_recall_num_images": [int(real.shape[0]), int(fake.shape[0])]}
