"""Inception Score (Salimans et al. 2016) as OpenAI's reference code computes it.

IS = exp(E_x KL(p(y|x) || p(y))), computed on `splits` consecutive parts of the image set;
the result is the mean and standard deviation over the parts (10 splits by default). As
OpenAI's code: p(y|x) = softmax over all 1008 outputs of the TF graph's classifier (the 8
unused classes are kept, none dropped), computed from pool3 @ W without the classifier's
bias (see `inception.UnbiasedLogits`); part i is rows [i * N // splits, (i + 1) * N //
splits). Computed here in float64 from the float32 logits (the reference computes the
softmax and the logs in float32).

The logits only exist when the converted weights include the classifier, i.e. when they
come from pytorch-fid's `pt_inception-2015-12-05` file; the TorchScript FID network has
pool3 only.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import numpy as np

from diffusion_jax.evaluation import inception


def inception_score(logits: np.ndarray, splits: int = 10) -> Tuple[float, float]:
  """Returns (mean, std) of the Inception Score over `splits` parts.

  Args:
    logits: [N, 1008] unbiased logits (any [N, K] works for other classifiers).
    splits: number of consecutive parts; each needs at least one image.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f"inception_score expects [N, classes] logits, got {logits.shape}.")
  n = logits.shape[0]
  if splits <= 0 or n < splits:
    raise ValueError(f"inception_score needs at least `splits`={splits} images, got {n}.")
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # [N, K]
  p = np.exp(log_p)
  scores = []
  for i in range(splits):
    lo, hi = i * n // splits, (i + 1) * n // splits
    part_p, part_log_p = p[lo:hi], log_p[lo:hi]
    log_py = np.log(part_p.mean(axis=0))  # [K]
    kl = np.sum(part_p * (part_log_p - log_py[None, :]), axis=1)  # [n_part]
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_outputs(outputs: Mapping[str, np.ndarray],
                                 splits: int = 10) -> Tuple[float, float]:
  """Inception Score from `features.InceptionFeatures` outputs, with a clear error.

  Raises:
    ValueError: if the outputs have no `logits` (weights without the classifier).
  """
  if "logits" not in outputs:
    raise ValueError(
        "No Inception Score: the Inception weights in use have no 1008-way classifier "
        "(the TorchScript FID network ships pool3 only). Convert pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth with `python -m "
        "diffusion_jax.tools.convert_inception --src FILE --out FILE.npz` and use that.")
  logits = np.asarray(outputs["logits"])
  if logits.shape[-1] != inception.NUM_CLASSES:
    raise ValueError(f"Expected {inception.NUM_CLASSES} logits, got {logits.shape[-1]}.")
  return inception_score(logits, splits)
