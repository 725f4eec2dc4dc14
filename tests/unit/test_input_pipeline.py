"""Tests for the input pipeline: batches are real examples, in a (seed, step)-determined
order, split over processes and sharded over 8 fake CPU devices.

Batches are checked against the original uint8 images independently of the pipeline's
own index arithmetic: each row is looked up (pixel for pixel, unflipped or flipped) among
all original images, and must equal x / 127.5 - 1 computed in float64.
"""

import os

import jax
import numpy as np
import PIL.Image
import pytest
import shared_data
import tensorflow_datasets as tfds
from fake_tfds_records import mock_record_data
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffusion_jax import config_base
from diffusion_jax.data import sources
from diffusion_jax.data import example_order
from diffusion_jax.data import input_pipeline

SHARED = shared_data.DATA_DIR


def data_config(**overrides):
  config = config_base.get_base_config().data
  for key, value in overrides.items():
    config[key] = value
  return config


def identify(batch, originals):
  """(example index, flipped) of every row of a float batch, by exact pixel lookup.

  Asserts each row is float32 and equals originals[i] / 127.5 - 1 (or its mirror image)
  computed in float64 and rounded once to float32, bit for bit.
  """
  batch = np.asarray(batch)
  assert batch.dtype == np.float32 and batch.ndim == 4
  assert batch.min() >= -1.0 and batch.max() <= 1.0
  u8 = np.round((batch.astype(np.float64) + 1.0) * 127.5)
  np.testing.assert_array_equal(batch, (u8 / 127.5 - 1.0).astype(np.float32))
  u8 = u8.astype(np.uint8)
  plain = {originals[i].tobytes(): i for i in range(len(originals))}
  mirrored = {originals[i][:, ::-1].tobytes(): i for i in range(len(originals))}
  found = []
  for row in u8:
    key = row.tobytes()
    assert (key in plain) or (key in mirrored), "a row is not an original image"
    found.append((plain[key], False) if key in plain else (mirrored[key], True))
  return np.array([f[0] for f in found]), np.array([f[1] for f in found])


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
  """24 random (so asymmetric) 8x8 RGB images in an npz file."""
  images = np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
  path = str(tmp_path_factory.mktemp("npz") / "small.npz")
  np.savez(path, x=images)
  return path, images


def first_batches(ds, n):
  """The first n elements of a dataset, as NumPy."""
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def model_batches(ds, n):
  """The first n training batches as the model sees them (float32 in [-1, 1]), with flips."""
  out = []
  for images, flips in first_batches(ds, n):
    assert images.dtype == np.uint8 and flips.dtype == bool
    out.append((np.asarray(input_pipeline.to_model_input(images, flips)), flips))
  return out


# --- the order ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 1797])
def test_every_epoch_is_a_permutation_and_epochs_differ(n):
  orders = [example_order.permuted_indices(7, e, np.arange(n), n) for e in range(3)]
  for order in orders:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  if n >= 16:
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[0], example_order.permuted_indices(8, 0, np.arange(n), n))
    assert not np.array_equal(orders[0], np.arange(n))


def test_order_is_uniform_and_flips_are_fair():
  n, seeds = 10, 3000
  first = np.array([example_order.permuted_indices(s, 0, [0], n)[0] for s in range(seeds)])
  counts = np.bincount(first, minlength=n)
  chi2 = ((counts - seeds / n) ** 2 / (seeds / n)).sum()
  assert chi2 < 30, counts  # 9 degrees of freedom: P(chi2 > 30) ~ 4e-4.
  flips = example_order.flip_bits(3, np.arange(20000))
  assert abs(flips.mean() - 0.5) < 0.015  # 4 standard deviations.


def _process_rows(global_batch_size, process_index, process_count):
  """The contiguous block of rows process `process_index` of `process_count` holds (the
  layout of a batch sharded over a mesh whose devices are ordered by process)."""
  local = global_batch_size // process_count
  return np.arange(process_index * local, (process_index + 1) * local, dtype=np.int64)


def create_train_dataset(config, *, global_batch_size, seed, start_step=0, process_index,
                         process_count, source=None):
  """The training rows of one (simulated) process."""
  source = source or sources.load_source(config, config.train_split)
  return input_pipeline.train_dataset(
      source, config, rows=_process_rows(global_batch_size, process_index, process_count),
      global_batch_size=global_batch_size, seed=seed, start_step=start_step)


def create_eval_dataset(config, split, *, global_batch_size, num_images=-1, process_index,
                        process_count):
  """One ordered pass over `split`: the rows of one (simulated) process."""
  return input_pipeline.eval_dataset(
      config, split, global_batch_size=global_batch_size, num_images=num_images,
      rows=_process_rows(global_batch_size, process_index, process_count))


# --- batches are real examples, shuffled per epoch, flipped as configured ------------


@pytest.fixture(scope="module")
def small_folder(small_npz, tmp_path_factory):
  """The same 24 images as PNG files (lossless, native size, sorted by name)."""
  _, images = small_npz
  root = tmp_path_factory.mktemp("folder")
  for i, image in enumerate(images):
    sub = root / ("a" if i < 12 else "b")  # nested folders are read recursively
    sub.mkdir(exist_ok=True)
    PIL.Image.fromarray(image).save(sub / f"img_{i:02d}.png")
  return str(root), images


@pytest.mark.parametrize("dataset", ["npz", "folder"])
def test_array_sources_cover_each_epoch_with_flips(dataset, small_npz, small_folder):
  path, images = small_npz if dataset == "npz" else small_folder
  config = data_config(dataset=dataset, path=path, image_size=8, channels=3,
                       random_flip=True)
  batches = model_batches(create_train_dataset(
      config, global_batch_size=8, seed=1, process_index=0, process_count=1), 6)
  assert all(b.shape == (8, 8, 8, 3) and b.dtype == np.float32 for b, _ in batches)
  ids, flips = zip(*(identify(b, images) for b, _ in batches))
  ids, flips = np.concatenate(ids), np.concatenate(flips)
  np.testing.assert_array_equal(flips, np.concatenate([f for _, f in batches]))
  for epoch in range(2):  # 24 examples = 3 batches: each epoch visits all exactly once.
    np.testing.assert_array_equal(np.sort(ids[epoch * 24:(epoch + 1) * 24]), np.arange(24))
  assert 8 <= flips.sum() <= 40  # flipped and unflipped examples both occur
  assert not np.array_equal(ids[:24], ids[24:])  # reshuffled each epoch
  assert not np.array_equal(ids[:24], np.arange(24))

  config.random_flip = False
  batches = model_batches(create_train_dataset(
      config, global_batch_size=8, seed=1, process_index=0, process_count=1), 6)
  ids_no_flip, flips = zip(*(identify(b, images) for b, _ in batches))
  assert not np.concatenate(flips).any()
  np.testing.assert_array_equal(np.concatenate(ids_no_flip), ids)  # same order


@pytest.mark.parametrize("name,size,channels", [("cifar10", 32, 3), ("mnist", 28, 1)])
def test_mock_tfds_batches(name, size, channels):
  with tfds.testing.mock_data(num_examples=20):
    originals = np.stack([ex["image"] for ex in tfds.as_numpy(tfds.load(name, split="train"))])
    config = data_config(dataset=name, image_size=size, channels=channels,
                         random_flip=channels == 3)
    ds = create_train_dataset(config, global_batch_size=10, seed=0,
                                             process_index=0, process_count=1)
    batches = model_batches(ds, 4)
  ids, flips = zip(*(identify(b, originals) for b, _ in batches))
  assert batches[0][0].shape == (10, size, size, channels)
  np.testing.assert_array_equal(np.sort(np.concatenate(ids[:2])), np.arange(20))
  assert np.concatenate(flips).any() == (channels == 3)


@pytest.mark.parametrize("file,key,size,channels", [
    ("cifar10_train_first4000.npz", "x", 32, 3), ("mnist.npz", "x_train", 28, 1)])
def test_real_npz_batches(file, key, size, channels):
  path = os.path.join(SHARED, file)
  with np.load(path) as f:
    originals = f[key].reshape(-1, size, size, channels)
  config = data_config(dataset="npz", path=path, image_size=size, channels=channels,
                       random_flip=True)
  batches = model_batches(create_train_dataset(
      config, global_batch_size=64, seed=5, process_index=0, process_count=1), 2)
  ids, flips = zip(*(identify(b, originals) for b, _ in batches))
  ids = np.concatenate(ids)
  assert len(set(ids.tolist())) == 128 and np.concatenate(flips).any()


@pytest.mark.parametrize("size", [8, 16])
def test_digits_batches_match_the_digits(size):
  config = data_config(dataset="digits", image_size=size, channels=1, random_flip=False)
  originals = sources.load_source(config, "train").images
  assert originals.shape == (1797, size, size, 1) and originals.dtype == np.uint8
  batches = model_batches(create_train_dataset(
      config, global_batch_size=32, seed=0, process_index=0, process_count=1), 2)
  assert all(b.shape == (32, size, size, 1) for b, _ in batches)
  ids, flips = zip(*(identify(b, originals) for b, _ in batches))
  assert not np.concatenate(flips).any() and len(set(np.concatenate(ids).tolist())) == 64
  config.random_flip = True  # same examples in the same order, some mirrored
  flipped = model_batches(create_train_dataset(
      config, global_batch_size=32, seed=0, process_index=0, process_count=1), 2)
  ids_f, flips_f = zip(*(identify(b, originals) for b, _ in flipped))
  flips_f = np.concatenate(flips_f)
  symmetric = np.array([np.array_equal(originals[i], originals[i][:, ::-1])
                        for i in np.concatenate(ids_f)])
  np.testing.assert_array_equal(flips_f | symmetric,
                                np.concatenate([f for _, f in flipped]) | symmetric)
  np.testing.assert_array_equal(np.concatenate(ids_f), np.concatenate(ids))
  assert 10 <= flips_f.sum() <= 54


# --- determinism, resume, processes -------------------------------------------------


def test_seed_and_step_determine_the_batch_whatever_the_start(small_npz):
  path, _ = small_npz
  config = data_config(dataset="npz", path=path, image_size=8, channels=3)

  def batches(seed, start, n, **kw):
    kw = kw or dict(process_index=0, process_count=1)
    return first_batches(create_train_dataset(
        config, global_batch_size=8, seed=seed, start_step=start, **kw), n)

  run = batches(3, 0, 70)  # crosses a 64-step planning chunk
  again = batches(3, 0, 70)
  resumed = batches(3, 61, 9)  # a run restarted at step 61 without reading steps 0..60
  for (a, fa), (b, fb) in zip(run, again):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
  for (a, fa), (b, fb) in zip(run[61:], resumed):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
  other_seed = batches(4, 0, 1)[0]
  assert not np.array_equal(run[0][0], other_seed[0])
  assert not np.array_equal(run[0][1], other_seed[1])
  # Processes: 4 simulated processes hold disjoint quarters that make up the batch.
  parts = [batches(3, 61, 3, process_index=i, process_count=4) for i in range(4)]
  for step in range(3):
    for k in range(2):  # images, flips
      np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]),
                                    run[61 + step][k])
    assert len({p[step][0].tobytes() for p in parts}) == 4


def test_sharded_global_batch_over_8_devices(small_npz):
  path, images = small_npz
  assert jax.device_count() == 8
  config = data_config(dataset="npz", path=path, image_size=8, channels=3)
  reference = [b for b, _ in model_batches(create_train_dataset(
      config, global_batch_size=16, seed=2, process_index=0, process_count=1), 4)]
  mesh = Mesh(np.array(jax.devices()), ("data",))
  iterator = input_pipeline.create_train_iterator(
      config, global_batch_size=16, seed=2, start_step=0, sharding=mesh)
  for step in range(4):
    batch = next(iterator)
    assert isinstance(batch, jax.Array) and batch.shape == (16, 8, 8, 3)
    assert batch.sharding.spec == P("data") and len(batch.addressable_shards) == 8
    for shard in batch.addressable_shards:
      assert shard.data.shape == (2, 8, 8, 3)
      np.testing.assert_array_equal(np.asarray(shard.data), reference[step][shard.index])
    np.testing.assert_array_equal(np.asarray(batch), reference[step])
  resumed = input_pipeline.create_train_iterator(
      config, global_batch_size=16, seed=2, start_step=3, sharding=mesh)
  np.testing.assert_array_equal(np.asarray(next(resumed)), reference[3])
  # A 2-D mesh: the batch is split over 'data' and replicated over 'model'.
  mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  batch = next(input_pipeline.create_train_iterator(
      config, global_batch_size=16, seed=2, sharding=NamedSharding(mesh2, P("data"))))
  assert {s.data.shape for s in batch.addressable_shards} == {(4, 8, 8, 3)}
  np.testing.assert_array_equal(np.asarray(batch), reference[0])


# --- evaluation ----------------------------------------------------------------------


def test_eval_iterator_visits_every_image_once_in_order():
  config = data_config(dataset="digits", image_size=8, channels=1, random_flip=True)
  originals = sources.load_source(config, "train").images
  mesh = Mesh(np.array(jax.devices()), ("data",))
  evaluation = input_pipeline.create_eval_iterator(config, "train", global_batch_size=64,
                                                   sharding=mesh)
  assert evaluation.num_images == 1797 and len(evaluation) == 29
  images, masks = [], []
  for _ in range(2):  # iterable more than once, same result
    batches = list(evaluation)
    assert len(batches) == 29
    images.append(np.concatenate([np.asarray(x) for x, _ in batches]))
    masks.append(np.concatenate([np.asarray(m) for _, m in batches]))
  np.testing.assert_array_equal(images[0], images[1])
  assert batches[0][1].sharding.spec == P("data") and batches[0][1].dtype == bool
  mask = masks[0]
  assert mask.sum() == 1797 and mask[:1797].all() and not mask[1797:].any()
  ids, flips = identify(images[0][:1797], originals)
  np.testing.assert_array_equal(ids, np.arange(1797))  # in order, no flips
  assert not flips.any()
  np.testing.assert_array_equal(images[0][1797:], np.repeat(images[0][1796:1797], 59, axis=0))

  part = input_pipeline.create_eval_iterator(config, "train[:100]", global_batch_size=64,
                                             sharding=mesh, num_images=70)
  batches = list(part)
  assert part.num_images == 70 and len(batches) == 2
  assert sum(int(np.asarray(m).sum()) for _, m in batches) == 70
  # Simulated processes split each eval batch into disjoint quarters.
  whole, _ = create_eval_dataset(config, "train", global_batch_size=64,
                                                num_images=130, process_index=0,
                                                process_count=1)
  quarters = [create_eval_dataset(config, "train", global_batch_size=64,
                                                 num_images=130, process_index=i,
                                                 process_count=4)[0] for i in range(4)]
  for k, (x, m) in enumerate(whole.as_numpy_iterator()):
    parts = [list(q.as_numpy_iterator())[k] for q in quarters]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), m)
  with pytest.raises(ValueError, match="num_images=5000 but .* holds 1797"):
    input_pipeline.create_eval_iterator(config, "train", global_batch_size=64, sharding=mesh,
                                        num_images=5000)


def test_record_source_through_the_pipeline():
  """LSUN-style random access (tfds mock serving serialized PNGs): crop, flip, scale."""
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (16, 16 + 2 * (i % 3), 3), dtype=np.uint8) for i in range(12)]
  cropped = np.stack([x[:, (x.shape[1] - 16) // 2:][:, :16] for x in images])
  config = data_config(dataset="lsun/cat", image_size=16, channels=3, random_flip=True)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  with mock_record_data(images):
    batches = model_batches(create_train_dataset(
        config, global_batch_size=8, seed=0, process_index=0, process_count=1), 3)
    evaluation = input_pipeline.create_eval_iterator(config, "train", global_batch_size=8,
                                                     sharding=mesh)
    eval_batches = [(np.asarray(x), np.asarray(m)) for x, m in evaluation]
  ids, flips = zip(*(identify(b, cropped) for b, _ in batches))
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)[:12]), np.arange(12))
  assert np.concatenate(flips).any() and not np.concatenate(flips).all()
  ids, flips = identify(np.concatenate([x for x, _ in eval_batches])[:12], cropped)
  np.testing.assert_array_equal(ids, np.arange(12))
  assert not flips.any() and sum(m.sum() for _, m in eval_batches) == 12


# --- errors before any compile ----------------------------------------------------


def test_clear_errors(small_npz, tmp_path, monkeypatch):
  path, _ = small_npz
  mesh = Mesh(np.array(jax.devices()), ("data",))
  config = data_config(dataset="npz", path=path, image_size=8, channels=3)
  with pytest.raises(ValueError, match=r"batch_size=12 must be a positive multiple of the 8 "
                     r"devices.*batch_size=16"):
    input_pipeline.create_train_iterator(config, global_batch_size=12, seed=0, sharding=mesh)
  with monkeypatch.context() as patch:  # Every process feeds its own rows.
    patch.setattr(jax, "process_count", lambda: 4)
    with pytest.raises(ValueError, match=r"batch_size=10 must be a positive multiple of the "
                       r"4 processes.*batch_size=12"):
      input_pipeline.create_train_iterator(config, global_batch_size=10, seed=0,
                                           sharding=Mesh(np.array(jax.devices()[:2]),
                                                         ("data",)))
  with pytest.raises(ValueError, match="axes \\('batch',\\).*'data'"):
    input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0,
                                         sharding=Mesh(np.array(jax.devices()), ("batch",)))
  bad = {
      "are 8x8 but data.image_size=32": dict(image_size=32),
      r"have 3 channel\(s\) but data.channels=1": dict(channels=1),
      "is not a file": dict(path=str(tmp_path / "none.npz")),
      "Unknown dataset 'cifar100'": dict(dataset="cifar100"),
  }
  for message, overrides in bad.items():
    wrong = data_config(**{**dict(dataset="npz", path=path, image_size=8, channels=3),
                           **overrides})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      input_pipeline.create_train_iterator(wrong, global_batch_size=8, seed=0, sharding=mesh)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
      input_pipeline.create_eval_iterator(wrong, "train", global_batch_size=8, sharding=mesh)


# --- two real processes --------------------------------------------------------------

_WORKER = r'''
import os, sys
process_id, port, out, npz, repo = sys.argv[1:6]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, repo)
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(process_id))
import numpy as np
from jax.sharding import Mesh
from diffusion_jax import config_base
from diffusion_jax.data import input_pipeline
config = config_base.get_base_config().data
config.dataset, config.path, config.image_size = "npz", npz, 8
mesh = Mesh(np.array(jax.devices()), ("data",))
train = input_pipeline.create_train_iterator(config, global_batch_size=16, seed=3,
                                             start_step=2, sharding=mesh)
saved = {}
for step in (2, 3):
  batch = next(train)
  for shard in batch.addressable_shards:
    saved[f"train{step}_{shard.index[0].start}"] = np.asarray(shard.data)
evaluation = input_pipeline.create_eval_iterator(config, "train", global_batch_size=16,
                                                 sharding=mesh)
for k, (images, mask) in enumerate(evaluation):
  for shard, mask_shard in zip(images.addressable_shards, mask.addressable_shards):
    saved[f"eval{k}_{shard.index[0].start}"] = np.asarray(shard.data)
    saved[f"mask{k}_{mask_shard.index[0].start}"] = np.asarray(mask_shard.data)
np.savez(out, **saved)
'''


def test_two_processes_assemble_the_single_process_batch(small_npz, tmp_path):
  """2 processes x 4 CPU devices on 127.0.0.1: each holds its half of the global batch."""
  import socket
  import subprocess
  import sys
  path, images = small_npz
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  (tmp_path / "worker.py").write_text(_WORKER)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, str(tmp_path / "worker.py"), str(i), str(port),
       str(tmp_path / f"out{i}.npz"), path, repo],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode()[-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  saved = {}
  for i in range(2):
    with np.load(tmp_path / f"out{i}.npz") as f:
      saved.update({(i, k): f[k] for k in f.files})
  config = data_config(dataset="npz", path=path, image_size=8, channels=3)
  reference = model_batches(create_train_dataset(
      config, global_batch_size=16, seed=3, start_step=2, process_index=0, process_count=1), 2)
  for k, step in enumerate((2, 3)):
    for row in range(0, 16, 2):
      owner = 0 if row < 8 else 1  # process 0 holds devices 0-3, rows 0-7
      np.testing.assert_array_equal(saved[owner, f"train{step}_{row}"],
                                    reference[k][0][row:row + 2])
  evaluated = np.concatenate([saved[0 if r < 8 else 1, f"eval{k}_{r}"]
                              for k in range(2) for r in range(0, 16, 2)])
  mask = np.concatenate([saved[0 if r < 8 else 1, f"mask{k}_{r}"]
                         for k in range(2) for r in range(0, 16, 2)])
  assert mask.sum() == 24 and mask[:24].all()
  ids, flips = identify(evaluated[:24], images)
  np.testing.assert_array_equal(ids, np.arange(24))
  assert not flips.any()
