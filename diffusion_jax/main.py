r"""Entry point: `python -m diffusion_jax.main --config configs/cifar10.py --workdir DIR`.

Any config field can be overridden (`--config.training.batch_size=64`) and any config can
be shrunk for a smoke run (`--config configs/cifar10.py:smoke`). `--mode` picks the job:
`train` runs `train.train_and_evaluate`; evaluation jobs add their modes through the
mapping `MODES` of the module `diffusion_jax.evaluation.modes` (name -> function of
(config, workdir)), which this file picks up when that module exists.

Multi-host: on a Cloud TPU VM (one host or a pod slice) and in SLURM jobs of several tasks
`jax.distributed.initialize()` is called and finds its peers by itself (`--distributed` /
`--nodistributed` force it on or off); elsewhere pass
`--coordinator_address host:port --num_processes N --process_id i`. See launch/.

Errors in the input (settings, files, a full disk, a non-finite loss) end the job with one
line on stderr and exit status 1 (`diffusion_jax.cli`; `--verbose` keeps the traceback).
"""

from __future__ import annotations

import importlib
import logging as py_logging
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from diffusion_jax import cli


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (`path.py` or `path.py:smoke`).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_string("mode", "train", "Job to run: train, or an evaluation mode.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs outside Cloud TPU.")
flags.DEFINE_integer("num_processes", None, "Number of processes (with coordinator).")
flags.DEFINE_integer("process_id", None, "This process's index (with coordinator).")
flags.DEFINE_bool("distributed", None,
                  "Call jax.distributed.initialize() without arguments, which finds the "
                  "other processes itself (Cloud TPU pod slices, SLURM). Default: on a "
                  "Cloud TPU VM and in a SLURM job of several tasks.")
flags.DEFINE_bool("library_info_logs", False,
                  "Show the INFO lines of orbax (several per checkpoint save); warnings "
                  "and errors are always shown.")
flags.mark_flags_as_required(["config", "workdir"])
cli.define_verbose_flag()

# Libraries whose INFO lines drown the training log (orbax logs ~20 per save).
_CHATTY_LIBRARIES = (f"{os.sep}orbax{os.sep}",)


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO and DEBUG records emitted from the files of chatty libraries."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def available_modes() -> dict[str, Callable]:
  """Returns the registered jobs: `train` plus the evaluation modes, if installed."""
  from diffusion_jax.training import train  # pylint: disable=g-import-not-at-top
  modes = {"train": train.train_and_evaluate}
  try:
    eval_modes = importlib.import_module("diffusion_jax.evaluation.modes")
  except ModuleNotFoundError as e:
    if e.name != "diffusion_jax.evaluation.modes":
      raise
  else:
    modes.update(eval_modes.MODES)
  return modes


def _initialize_distributed() -> None:
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id.")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
    return
  auto = FLAGS.distributed
  if auto is None:
    on_tpu_vm = any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))
    auto = on_tpu_vm or int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if auto:
    jax.distributed.initialize()


def _reuse_host_memory(config) -> None:
  """Sets glibc's malloc for CPU jobs before JAX starts (`backends.cpu.host_memory`), when
  the kernel policy may pick the CPU backend and `cpu.reuse_host_memory` is on."""
  cpu_config = config.get("cpu") or {}
  if (str(config.model.get("kernels", "auto")) != "xla"
      and bool(cpu_config.get("reuse_host_memory", True))):
    from diffusion_jax.backends.cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.reuse_freed_memory()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  _reuse_host_memory(FLAGS.config)  # before JAX computes anything
  if not FLAGS.library_info_logs:
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TensorFlow only feeds data: keep it off the accelerators JAX uses.
  tf.config.experimental.set_visible_devices([], "GPU")
  modes = available_modes()
  if FLAGS.mode not in modes:
    raise app.UsageError(f"Unknown --mode={FLAGS.mode!r}; available: {sorted(modes)}.")
  _initialize_distributed()
  logging.info("JAX process %d of %d; %d local device(s), %d device(s) in all: %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[:8])
  modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  jax.config.config_with_absl()
  app.run(cli.absl_main(main))
