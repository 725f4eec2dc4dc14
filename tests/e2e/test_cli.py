"""Every command ends an error in its input with one line on stderr and exit status 1.

Real subprocesses (run side by side): `python -m diffusion_jax.main` and the tools, each
given a bad input. No traceback by default (one with --verbose), the last line names the
problem, and the workdir's files are unchanged (hashes before and after).
"""

import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import training_testlib

MAIN = [sys.executable, "-m", "diffusion_jax.main",
        f"--config={training_testlib.REPO}/configs/digits.py:smoke"]


def _hashes(root):
  out = {}
  for base, _, names in os.walk(root):
    for name in names:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with a finished 5-step run (checkpoints, config.json, samples, events)."""
  cache = training_testlib.enable_compilation_cache(
      tmp_path_factory.getbasetemp() / "jax_cache")
  training_testlib.disable_compilation_cache()  # Only the child uses it.
  workdir = tmp_path_factory.mktemp("cli") / "run"
  done = subprocess.run([*MAIN, f"--workdir={workdir}",
                         "--config.training.num_train_steps=5"],
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, **cache), cwd=training_testlib.REPO)
  assert done.returncode == 0, done.stderr[-3000:]
  return workdir


def _bad_folder(root):
  root.mkdir()
  rng = np.random.default_rng(0)
  PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / "ok.png")
  buffer = io.BytesIO()
  PIL.Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buffer, "JPEG")
  (root / "cut.jpg").write_bytes(buffer.getvalue()[:100])
  return root


def test_user_errors_are_one_line_and_change_nothing(trained, tmp_path):
  folder = _bad_folder(tmp_path / "images")
  cases = {  # name -> (argv, what the last line must say)
      "learning rate": ([*MAIN, f"--workdir={trained}", "--config.optim.learning_rate=0"],
                        "optim.learning_rate=0.0 is out of range: it must be > 0"),
      "ema decay": ([*MAIN, f"--workdir={trained}", "--config.optim.ema_decay=1.0"],
                    "optim.ema_decay=1.0 is out of range: it must be in [0, 1)"),
      "bad image": ([*MAIN, f"--workdir={trained}", "--config.data.dataset=folder",
                     f"--config.data.path={folder}"], f"{folder / 'cut.jpg'} (100 bytes)"),
      "eval on nothing": ([*MAIN, "--mode=sample", f"--workdir={tmp_path / 'none'}"],
                          "No checkpoint in"),
      "fid": ([sys.executable, "-m", "diffusion_jax.tools.fid", "--a",
               str(tmp_path / "missing_a.npz"), "--b", str(tmp_path / "missing_b.npz")],
              "missing_a.npz"),
      "fid_stats": ([sys.executable, "-m", "diffusion_jax.tools.fid_stats", "--images",
                     str(folder), "--weights", str(tmp_path / "none.npz"), "--out",
                     str(tmp_path / "stats.npz")], "none.npz"),
      "export": ([sys.executable, "-m", "diffusion_jax.tools.export_diffusers",
                  f"--workdir={tmp_path / 'none'}", f"--out={tmp_path / 'out'}"],
                 "config.json"),
      "import": ([sys.executable, "-m", "diffusion_jax.tools.import_checkpoint",
                  f"--config={training_testlib.REPO}/configs/digits.py:smoke",
                  f"--src={tmp_path / 'missing.ckpt'}", f"--workdir={trained}"],
                 "already holds"),
  }
  before = _hashes(trained)
  procs = {name: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, cwd=training_testlib.REPO)
           for name, (argv, _) in cases.items()}
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=600)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, (name, stderr[-3000:])
    assert "Traceback" not in stderr, (name, stderr[-3000:])
    assert last.startswith("error: ") and cases[name][1] in last, (name, last)
  assert _hashes(trained) == before
  assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_verbose_keeps_the_traceback(trained):
  done = subprocess.run([*MAIN, f"--workdir={trained}", "--config.optim.learning_rate=0",
                         "--verbose"], capture_output=True, text=True, timeout=600,
                        cwd=training_testlib.REPO)
  assert done.returncode != 0
  assert "Traceback" in done.stderr and "optim.learning_rate=0.0" in done.stderr
