r"""Computes FID reference statistics (mu, sigma) of an image set with the JAX Inception.

  python -m diffusion_jax.tools.fid_stats --images ../shared/data/mnist.npz:x_train \
      --weights inception_fid.npz --out mnist_train_stats.npz [--num 10000]

The output .npz has `mu` and `sigma` (TTUR / pytorch-fid layout) plus `meta/origin`,
`meta/num_images` and `meta/inception` (the converted weights' source); `--features_out`
also keeps the pool3 features (for precision/recall).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np

from diffusion_jax import cli
from diffusion_jax import ops as ops_lib
from diffusion_jax import sharding
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import image_sources
from diffusion_jax.evaluation import inception_weights


def compute_features(images: str, weights: str, num: int = -1, batch_size: int = 200,
                     with_logits: bool = False, kernels: str = "auto"
                     ) -> Dict[str, np.ndarray]:
  """Returns the Inception outputs of an image source and the throughput.

  `kernels` is the kernel policy (`diffusion_jax.ops`): on the CPU backend the program
  gets the XLA:CPU compiler options that speed up its convolutions.

  Returns:
    {'pool3': [N, 2048], ('logits': [N, 1008]), 'seconds': scalar, 'source': str}.
  """
  params, has_logits, meta = inception_weights.load_weights(weights)
  if with_logits and not has_logits:
    raise ValueError(f"{weights} has no 1008-way classifier (source {meta.get('source')}); "
                     "the Inception Score needs weights converted from pytorch-fid's "
                     "pt_inception-2015-12-05-6726825d.pth.")
  mesh = sharding.make_mesh()
  extractor = features_lib.InceptionFeatures(
      params, with_logits=with_logits, batch_size=batch_size, devices=list(mesh.devices.flat),
      jit_options=ops_lib.resolve(kernels, mesh).jit_options())
  # Compile on the first batch outside the timing.
  first = next(image_sources.iterate_images(images, num, batch_size=extractor.batch_size))
  extractor.apply_batch(first[:1])
  start = time.time()
  out = extractor(image_sources.iterate_images(images, num, batch_size=extractor.batch_size),
                  log_every=10)
  out["seconds"] = np.array(time.time() - start)
  out["source"] = np.array(meta.get("source", ""))
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", required=True, help="file.npz[:key] or image folder")
  parser.add_argument("--weights", required=True, help="converted Inception .npz")
  parser.add_argument("--out", required=True, help="output statistics .npz")
  parser.add_argument("--num", type=int, default=-1, help="first N images (-1: all)")
  parser.add_argument("--batch_size", type=int, default=200)
  parser.add_argument("--features_out", default="", help="also save pool3 features here")
  parser.add_argument("--kernels", default="auto", choices=ops_lib.POLICIES,
                      help="kernel policy (auto: the CPU backend's options on a CPU)")
  args = parser.parse_args(argv)
  out = compute_features(args.images, args.weights, args.num, args.batch_size,
                         kernels=args.kernels)
  pool3 = out["pool3"]
  mu, sigma = fid.feature_statistics(pool3)
  fid.save_statistics(args.out, mu, sigma, {"origin": args.images,
                                            "num_images": pool3.shape[0],
                                            "inception": str(out["source"])})
  if args.features_out:
    np.savez(args.features_out, pool3=pool3)
  seconds = float(out["seconds"])
  print(json.dumps({"out": args.out, "num_images": int(pool3.shape[0]),
                    "seconds": round(seconds, 2),
                    "images_per_second": round(pool3.shape[0] / seconds, 2)}))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argv(main))
