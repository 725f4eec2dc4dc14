r"""How recognizable are the quickstart's samples? A classifier of real digits scores them.

  python -m diffusion_jax.main --config configs/digits.py --workdir workdirs/digits
  python benchmarks/digits_quality.py --workdir workdirs/digits

A logistic-regression classifier is trained on 60% of scikit-learn's real 8x8 digits
(stratified, seed 0). It then scores (a) the other 40% of the real digits and (b) samples
of the run's EMA parameters drawn with the run's sampler settings, with two figures:
  * confidence: the mean top-class probability max_y p(y|x);
  * IS-like diversity: exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction over the set
    (the Inception Score with this classifier; 10 is the maximum for 10 balanced classes).
Samples are quantized exactly as real digits are stored by the input pipeline (uint8,
then back to the 0..16 scale) before scoring. The target of the quickstart is that the
samples reach at least 80% of the held-out real digits' value on both figures.

A class-conditional run (configs/digits.py:cond) is scored per requested class instead:
for each guidance scale of --guidance_scales, N samples with balanced labels (sample i
asks for digit i mod 10), the classifier's accuracy at recognizing the requested digit
(the target: >= 90% on average with guidance), and a grid with one row per class.

  python -m diffusion_jax.main --config configs/digits.py:cond --workdir workdirs/digits_cond
  python benchmarks/digits_quality.py --workdir workdirs/digits_cond
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import ml_collections
import numpy as np

from benchmarks import harness
from diffusion_jax import image_grid
from diffusion_jax import sampling
from diffusion_jax import sharding
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.training import checkpointing
from diffusion_jax.training import params_checkpoint
from diffusion_jax.training import run_setup

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/digits", "A workdir trained with configs/digits.py.")
flags.DEFINE_integer("num_samples", 1000, "Samples to score.")
flags.DEFINE_float("target", 0.8, "Required fraction of the real digits' figures.")
flags.DEFINE_string("guidance_scales", "1,3", "Class-conditional runs: the guidance scales "
                    "to score (1: the conditional model, > 1: guided).")
flags.DEFINE_float("class_target", 0.9, "Class-conditional runs: required accuracy at the "
                   "requested class with guidance.")


def digit_features(images_uint8: np.ndarray) -> np.ndarray:
  """[N, 8, 8, 1] uint8 images -> [N, 64] features in [0, 1] (sklearn's 0..16 scale / 16)."""
  values = images_uint8.astype(np.float64) * 16.0 / 255.0
  return values.reshape(len(values), -1) / 16.0


def scores(probs: np.ndarray) -> dict[str, float]:
  """Confidence and IS-like diversity of class probabilities [N, 10]."""
  probs = np.clip(probs, 1e-12, 1.0)
  marginal = probs.mean(axis=0)
  kl = np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)
  return {"confidence": float(probs.max(axis=1).mean()), "is_like": float(np.exp(kl.mean())),
          "classes_present": int(len(np.unique(probs.argmax(axis=1))))}


def main(argv):
  """Scores real digits and the run's samples; prints the comparison."""
  del argv
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model
  from sklearn import model_selection

  digits = datasets.load_digits()
  real_uint8 = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      digit_features(real_uint8), digits.target, test_size=0.4, random_state=0,
      stratify=digits.target)
  classifier = linear_model.LogisticRegression(max_iter=5000, C=1.0)
  classifier.fit(x_train, y_train)
  accuracy = classifier.score(x_test, y_test)

  with open(os.path.join(FLAGS.workdir, checkpointing.CONFIG_FILE)) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if (config.data.dataset, config.data.image_size, config.data.channels) != ("digits", 8, 1):
    raise ValueError(f"{FLAGS.workdir} is not an 8x8 digits run (configs/digits.py).")
  mesh = sharding.make_mesh()
  ops = run_setup.build_ops(config, mesh)
  params, step = params_checkpoint.load_eval_params(FLAGS.workdir, config, use_ema=True,
                                                    mesh=mesh)
  if int(config.model.get("num_classes", 0)):
    return _score_classes(config, mesh, ops, params, step, classifier, accuracy)
  sample_fn = sampling.make_sample_fn(run_setup.build_model(config, ops),
                                      run_setup.build_schedule(config), config, mesh,
                                      ops.jit_options())
  start = time.time()
  samples = sampling.sample_indices(sample_fn, params, np.arange(FLAGS.num_samples),
                                    mesh)  # [N, 8, 8, 1] in [-1, 1]
  seconds = time.time() - start
  samples_uint8 = image_grid.to_uint8(samples)
  grid_path = image_grid.save_png(
      os.path.join(FLAGS.workdir, "samples", f"benchmark_step_{step:08d}.png"),
      image_grid.make_grid(samples_uint8[:100], num_cols=10))

  real = scores(classifier.predict_proba(x_test))
  fake = scores(classifier.predict_proba(digit_features(samples_uint8)))
  print(f"classifier: logistic regression, held-out accuracy {accuracy:.3f}")
  print(f"checkpoint step {step}, {FLAGS.num_samples} samples "
        f"({config.sampling.sampler}, {seconds:.1f} s), grid: {grid_path}")
  print(f"operations: {ops.description}; {harness.host_memory_note(host_memory_reused)}")
  print(f"{'':24s}{'confidence':>12s}{'IS-like':>10s}{'classes':>9s}")
  print(f"{'real digits (held out)':24s}{real['confidence']:12.3f}{real['is_like']:10.2f}"
        f"{real['classes_present']:9d}")
  print(f"{'samples (EMA)':24s}{fake['confidence']:12.3f}{fake['is_like']:10.2f}"
        f"{fake['classes_present']:9d}")
  ratios = {k: fake[k] / real[k] for k in ("confidence", "is_like")}
  print(f"{'samples / real':24s}{ratios['confidence']:12.1%}{ratios['is_like']:10.1%}")
  ok = all(r >= FLAGS.target for r in ratios.values())
  print(f"target >= {FLAGS.target:.0%} of the real digits' figures: "
        f"{'reached' if ok else 'NOT reached'}")
  counts = np.bincount(classifier.predict(digit_features(samples_uint8)), minlength=10)
  print("samples per predicted class:", counts.tolist())


def _score_classes(config, mesh, ops, params, step, classifier, accuracy) -> int:
  """A class-conditional run: accuracy at the requested class per guidance scale."""
  num = FLAGS.num_samples - FLAGS.num_samples % 10
  requested = np.arange(num) % 10  # `sampling.labels` "balanced"
  print(f"classifier: logistic regression, held-out accuracy {accuracy:.3f}")
  print(f"checkpoint step {step}, {num} samples per scale, {config.sampling.sampler}; "
        f"operations: {ops.description}")
  print(f"{'guidance scale':>15s}{'accuracy':>10s}{'worst class':>13s}{'seconds':>9s}")
  best = 0.0
  for scale in (float(v) for v in FLAGS.guidance_scales.split(",")):
    config.sampling.labels = "balanced"
    config.sampling.guidance_scale = scale
    sample_fn = sampling.make_sample_fn(run_setup.build_model(config, ops),
                                        run_setup.build_schedule(config), config, mesh,
                                        ops.jit_options())
    start = time.time()
    samples = image_grid.to_uint8(sampling.sample_indices(sample_fn, params,
                                                          np.arange(num), mesh))
    seconds = time.time() - start
    predicted = classifier.predict(digit_features(samples))
    per_class = [float(np.mean(predicted[requested == c] == c)) for c in range(10)]
    hit = float(np.mean(predicted == requested))
    best = max(best, hit) if scale > 1 else best
    print(f"{scale:15g}{hit:10.1%}{min(per_class):13.1%}{seconds:9.1f}")
    rows = np.stack([samples[requested == c][:10] for c in range(10)])  # [10, 10, 8, 8, 1]
    path = image_grid.save_png(
        os.path.join(FLAGS.workdir, "samples", f"classes_scale{scale:g}_step{step:08d}.png"),
        image_grid.make_grid(rows.reshape((-1,) + rows.shape[2:]), num_cols=10))
    print(f"{'':15s}grid (one row per class 0-9): {path}")
  ok = best >= FLAGS.class_target
  print(f"target >= {FLAGS.class_target:.0%} at the requested class with guidance: "
        f"{'met' if ok else 'NOT met'}")
  return 0 if ok else 1


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
