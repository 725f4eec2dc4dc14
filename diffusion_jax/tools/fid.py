r"""FID between two image sets or statistics files (and optionally precision/recall, IS).

  python -m diffusion_jax.tools.fid --a ../shared/data/mnist.npz:x_train \
      --b ../shared/data/mnist.npz:x_test --weights inception_fid.npz --num 2000
  python -m diffusion_jax.tools.fid --a samples/ --b cifar10_train_stats.npz \
      --weights inception_fid.npz

Each of --a/--b is a statistics .npz (keys `mu`, `sigma`; also TTUR/pytorch-fid files) or
an image source (file.npz[:key] or a folder). --precision_recall needs two image sources;
--inception_score scores --a and needs weights with the classifier. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, Optional, Sequence

from diffusion_jax import cli
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import image_sources
from diffusion_jax.evaluation import inception_score as is_lib
from diffusion_jax.evaluation import precision_recall as pr_lib
from diffusion_jax.tools import fid_stats


def evaluate(a: str, b: str, weights: str = "", num: int = -1, batch_size: int = 200,
             precision_recall: bool = False, inception_score: bool = False) -> Dict:
  """Returns {'fid', ... timings, optional 'precision', 'recall', 'inception_score'}."""
  result: Dict = {"a": a, "b": b}
  stats, pool3 = {}, {}
  for name, spec in (("a", a), ("b", b)):
    if image_sources.is_statistics_file(spec):
      if precision_recall or (inception_score and name == "a"):
        raise ValueError(f"--{name} {spec} is a statistics file; precision/recall and the "
                         "Inception Score need images.")
      stats[name] = fid.load_statistics(spec)
      continue
    if not weights:
      raise ValueError(f"--{name} {spec} is an image source; pass --weights (the "
                       "converted Inception .npz).")
    out = fid_stats.compute_features(spec, weights, num, batch_size,
                                     with_logits=inception_score and name == "a")
    pool3[name] = out["pool3"]
    stats[name] = fid.feature_statistics(out["pool3"])
    seconds = float(out["seconds"])
    result[f"num_{name}"] = int(out["pool3"].shape[0])
    result[f"images_per_second_{name}"] = round(out["pool3"].shape[0] / seconds, 2)
    if "logits" in out:
      mean, std = is_lib.inception_score_from_outputs(out)
      result["inception_score"], result["inception_score_std"] = mean, std
  result["fid"] = fid.frechet_distance(*stats["a"], *stats["b"])
  if precision_recall:
    result.update(pr_lib.precision_recall(pool3["b"], pool3["a"]))
  return result


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--a", required=True, help="generated/first set: images or stats")
  parser.add_argument("--b", required=True, help="reference set: images or stats")
  parser.add_argument("--weights", default="", help="converted Inception .npz")
  parser.add_argument("--num", type=int, default=-1, help="first N images of each source")
  parser.add_argument("--batch_size", type=int, default=200)
  parser.add_argument("--precision_recall", action="store_true",
                      help="precision/recall of --a against --b (k=3)")
  parser.add_argument("--inception_score", action="store_true", help="IS of --a")
  args = parser.parse_args(argv)
  print(json.dumps(evaluate(args.a, args.b, args.weights, args.num, args.batch_size,
                            args.precision_recall, args.inception_score)))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argv(main))
