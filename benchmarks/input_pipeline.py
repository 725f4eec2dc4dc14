"""Input pipeline throughput (batches/s) at the paper's batch sizes vs what training eats.

  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --train_images_per_s 2.5   # this CPU's train step

Measured standalone (nothing else running in the process), after warm-up:
- CIFAR10 at batch 128 and MNIST at batch 128: `input_pipeline.create_train_iterator`,
  the whole path to a device jax.Array in [-1, 1] (array sources: the CIFAR10 file of
  REFERENCE.md, MNIST from mnist.npz).
- 256x256 at batch 64 from encoded images (the CelebA-HQ / LSUN path: tfds records with
  PNG or JPEG bytes, decoded by tf.data): `input_pipeline.train_dataset` (all rows of the
  batch) over an in-memory `RecordSource` of 256 distinct images encoded in memory, to
  host uint8 batches and flip bits.
The consumption compared with is the paper's TPU v3-8 rate (21 steps/s at batch 128 for
CIFAR10, 2.2 steps/s at batch 64 for 256x256), the demanding case; and, when given, this
machine's train step (images/s, from benchmarks.train_step) at the same batch.
"""

from __future__ import annotations

import argparse
import io
import time

import jax
import numpy as np
import PIL.Image
import tensorflow as tf

from benchmarks import configs
from benchmarks import harness
from diffusion_jax import sharding as sharding_lib
from diffusion_jax.backends.cpu import host_memory
from diffusion_jax.data import input_pipeline
from diffusion_jax.data import sources

CIFAR = configs.CIFAR_SUBSET
MNIST = configs.MNIST
PAPER_STEPS_PER_S = {"cifar10": 21.0, "mnist": 21.0, "256": 2.2}


def batches_per_second(iterator, num_batches: int, warmup: int = 3) -> float:
  """Batches per second that `iterator` delivers, after `warmup` untimed batches."""
  for _ in range(warmup):
    harness.block(next(iterator))
  start = time.perf_counter()
  for _ in range(num_batches):
    harness.block(next(iterator))
  return num_batches / (time.perf_counter() - start)


def array_source_rate(network: str, batch: int, num_batches: int) -> float:
  """Batches/s of `create_train_iterator` over the network's array file (to device)."""
  config = configs.load_config(network)
  config.data.dataset = "npz"
  config.data.path = CIFAR if network == "cifar10" else MNIST
  config.data.npz_key = "x" if network == "cifar10" else "x_train"
  mesh = sharding_lib.make_mesh(jax.devices()[:1])
  iterator = input_pipeline.create_train_iterator(
      config.data, global_batch_size=batch, seed=0, sharding=mesh)
  return batches_per_second(iterator, num_batches)


def _encoded_records(num: int, size: int, fmt: str) -> list[bytes]:
  """`num` serialized tf.train.Examples holding distinct size x size images in `fmt`."""
  rng = np.random.default_rng(0)
  records = []
  for _ in range(num):
    # Smooth images (as photographs compress) rather than noise.
    base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    image = PIL.Image.fromarray(base).resize((size, size), PIL.Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, fmt)
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[buf.getvalue()]))}
    records.append(tf.train.Example(
        features=tf.train.Features(feature=feature)).SerializeToString())
  return records


class _Records(list):
  """In-memory records with the batched read (`__getitems__`) that `RecordSource` uses."""

  def __getitems__(self, keys):
    return [self[k] for k in keys]


def encoded_source_rate(batch: int, num_batches: int, fmt: str) -> float:
  """Batches/s of `train_dataset` decoding 256x256 `fmt` records (to host arrays)."""
  config = configs.load_config("256")
  source = sources.RecordSource(
      name=f"in-memory {fmt}", records=_Records(_encoded_records(256, 256, fmt)),
      crop_and_resize=False, image_size=256, channels=3)
  ds = input_pipeline.train_dataset(source, config.data, rows=np.arange(batch),
                                    global_batch_size=batch, seed=0)
  return batches_per_second(iter(ds), num_batches)


def main(argv=None):
  """Measures each source's batches/s; prints the table."""
  host_memory_reused = host_memory.reuse_freed_memory()  # before JAX computes
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_batches", type=int, default=50)
  parser.add_argument("--train_images_per_s", type=float, default=None,
                      help="this machine's measured train-step images/s (CIFAR10)")
  args = parser.parse_args(argv)
  load_before = harness.load_average()
  rows = [("CIFAR10 (array source)", "cifar10", 128,
           array_source_rate("cifar10", 128, args.num_batches)),
          ("MNIST (array source)", "mnist", 128,
           array_source_rate("mnist", 128, args.num_batches)),
          ("256x256 PNG records (decode)", "256", 64,
           encoded_source_rate(64, max(args.num_batches // 5, 5), "PNG")),
          ("256x256 JPEG records (decode)", "256", 64,
           encoded_source_rate(64, max(args.num_batches // 5, 5), "JPEG"))]
  load_after = harness.load_average()
  print("## Input pipeline\n")
  print(harness.machine_line())
  print(f"load average (1 min): before {load_before:.2f}, after {load_after:.2f}\n")
  print("| source | batch | pipeline batches/s | paper TPU v3-8 steps/s | ratio (target >= 10) |"
        " this CPU's steps/s | ratio |")
  print("|---|---|---|---|---|---|---|")
  for name, network, batch, rate in rows:
    paper = PAPER_STEPS_PER_S[network]
    cpu = ""
    if args.train_images_per_s and network == "cifar10":
      steps = args.train_images_per_s / batch
      cpu = f"{steps:.3g} | {rate / steps:.0f}x"
    else:
      cpu = "n/a | n/a"
    print(f"| {name} | {batch} | {rate:.1f} | {paper} | {rate / paper:.1f}x | {cpu} |")
  print("\n- The pipeline ran alone; in training it shares the host CPU with the step (on "
        "an accelerator host the step does not use the host's cores).")
  print(f"- {harness.host_memory_note(host_memory_reused)}.")


if __name__ == "__main__":
  main()
