r"""FID and wall time of every sampler on one trained model (the README's "Fast sampling").

  python -m benchmarks.sampler_quality --workdir workdirs/mnist_cpu \
      --inception_weights workdirs/fid/inception_fid.npz \
      --fid_reference workdirs/fid/mnist_train2k_stats.npz --num_samples 2000 \
      --out benchmarks/sampler_quality_mnist.md

For each entry of `--samplers` (`name:steps`, default the README's table: ancestral over
all T steps, DDIM (eta 0) 10/20/50/100, DPM-Solver++(2M) 10/15/20/25, Heun 10/18,
respaced ancestral 50/100) it runs the sampling job on the run's own config
(`<workdir>/config.json`, EMA parameters; each sampler's default grid, see
`diffusion_jax.sampling`), so the sets are resumable and sample i is a function of
(seed, i) only, then FID of the set against `--fid_reference` with the JAX
TF-Inception. Wall time is the sampling job's (measured while the set was generated,
kept in `<out>.json` so an interrupted benchmark resumes with it; Inception time is not
included). The table goes to `--out` (markdown) and `<out>.json`; the last line says
whether DPM-Solver++(2M) with 20 network calls is within `--target` (10%) of the FID of
ancestral sampling.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
import ml_collections

from benchmarks import harness
from diffusion_jax import sampling
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.evaluation import features as features_lib
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_weights
from diffusion_jax.evaluation import sample_job
from diffusion_jax.training import checkpointing

DEFAULT_SAMPLERS = ("ancestral:0,ddim:10,ddim:20,ddim:50,ddim:100,dpmpp_2m:10,dpmpp_2m:15,"
                    "dpmpp_2m:20,dpmpp_2m:25,heun:10,heun:18,respaced:50,respaced:100")
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/mnist_cpu", "A trained run (configs/mnist.py:cpu).")
flags.DEFINE_string("inception_weights", "workdirs/fid/inception_fid.npz",
                    "Converted Inception weights (tools.convert_inception).")
flags.DEFINE_string("fid_reference", "workdirs/fid/mnist_train2k_stats.npz",
                    "FID statistics of the reference images (tools.fid_stats).")
flags.DEFINE_integer("num_samples", 2000, "Samples per sampler.")
flags.DEFINE_integer("batch_size", 250, "Global sampling batch.")
flags.DEFINE_string("samplers", DEFAULT_SAMPLERS,
                    "Comma-separated name:steps (ancestral: any steps, all T are used).")
flags.DEFINE_string("out", "benchmarks/sampler_quality.md", "Markdown table to write.")
flags.DEFINE_float("target", 0.10, "dpmpp_2m at 20 calls: largest FID excess over ancestral.")
flags.DEFINE_integer("fid_batch_size", 100, "Inception batch.")


def sampler_config(base: ml_collections.ConfigDict, name: str, steps: int):
  """The run's config with the sampler, its steps and the benchmark's sample set."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.sampling.sampler = name
  if name != "ancestral":
    config.sampling.num_steps = steps
  config.sampling.num_samples = FLAGS.num_samples
  config.sampling.batch_size = FLAGS.batch_size
  config.sampling.shard_size = max(FLAGS.batch_size, 1000)
  sampling.check_sampler(config)
  return config


def sample_fid(extractor, directory: str, ref_mu, ref_sigma) -> float:
  """FID of the first num_samples images of a sample set (statistics cached beside it)."""
  cache = os.path.join(directory, f"benchmark_fid_stats_{FLAGS.num_samples}.npz")
  if os.path.exists(cache):
    mu, sigma = fid.load_statistics(cache)
  else:
    pool3 = extractor(sample_job.iterate_samples(directory, FLAGS.num_samples))["pool3"]
    mu, sigma = fid.feature_statistics(pool3)
    fid.save_statistics(cache, mu, sigma, {"origin": directory,
                                           "num_images": str(FLAGS.num_samples)})
  return float(fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))


def main(argv):
  del argv
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  with open(os.path.join(FLAGS.workdir, checkpointing.CONFIG_FILE)) as f:
    base = ml_collections.ConfigDict(json.load(f))
  entries = []
  for item in FLAGS.samplers.split(","):
    name, steps = item.split(":")
    entries.append((name, int(steps), sampler_config(base, name, int(steps))))
  params, has_logits, _ = inception_weights.load_weights(FLAGS.inception_weights)
  del has_logits
  extractor = features_lib.InceptionFeatures(params, batch_size=FLAGS.fid_batch_size)
  ref_mu, ref_sigma = fid.load_statistics(FLAGS.fid_reference)
  record_path = FLAGS.out + ".json"
  record = {}
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
  rows = []
  for name, steps, config in entries:
    key = sampling.tag(config)
    entry = record.get(key, {"seconds": 0.0})
    start = time.time()
    summary = sample_job.generate_samples(config, FLAGS.workdir)
    if "samples_per_second" in summary:  # something was generated in this run
      entry["seconds"] += time.time() - start
    entry.update(name=name, steps=steps if name != "ancestral" else None,
                 network_calls=summary["network_calls"], step=summary["checkpoint_step"],
                 spacing=summary.get("spacing", ""), num_samples=FLAGS.num_samples,
                 fid=sample_fid(extractor, summary["directory"], ref_mu, ref_sigma))
    record[key] = entry
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
    rows.append(entry)
    print(f"{key}: FID {entry['fid']:.2f}, {entry['seconds']:.0f} s", flush=True)
  write_table(rows, host_memory_reused)


def write_table(rows, host_memory_reused) -> None:
  """Writes the markdown table and the target's verdict to --out."""
  ancestral = [r for r in rows if r["name"] == "ancestral"]
  lines = [f"{harness.machine_line()}",
           f"Model: {FLAGS.workdir} (checkpoint step {rows[0]['step']}, EMA), "
           f"{FLAGS.num_samples} samples per sampler vs {FLAGS.fid_reference}; "
           f"{harness.host_memory_note(host_memory_reused)}", "",
           "| sampler | grid | network calls | FID | sampling wall time | s / sample |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['spacing'] or 'all T'} | {r['network_calls']} | "
                 f"{r['fid']:.2f} | {r['seconds'] / 60:.1f} min | "
                 f"{r['seconds'] / r['num_samples']:.3f} |")
  target = [r for r in rows if r["name"] == "dpmpp_2m" and r["network_calls"] == 20]
  if ancestral and target:
    excess = target[0]["fid"] / ancestral[0]["fid"] - 1.0
    verdict = "met" if excess <= FLAGS.target else "NOT met"
    lines += ["", f"DPM-Solver++(2M), 20 calls: FID {target[0]['fid']:.2f} vs ancestral "
              f"{ancestral[0]['network_calls']} calls {ancestral[0]['fid']:.2f} "
              f"({excess:+.1%}); target within {FLAGS.target:.0%}: {verdict}."]
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(main)
