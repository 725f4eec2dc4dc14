"""`host_memory.reuse_freed_memory`: freed host buffers are reused, not page-faulted anew.

Each check runs in a fresh process (malloc settings are process-wide and must precede the
first allocations of JAX's threads): a jitted program whose 64 MiB result XLA allocates
at every call (and frees when Python drops it), its minor page faults counted per call.
"""

import os
import subprocess
import sys

import pytest

from diffusion_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import resource, sys
from diffusion_jax import host_memory
print(host_memory.reuse_freed_memory())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(jnp.outer(x, x)))  # a 64 MiB result, freed after each call
x = jnp.linspace(0, 1, 4096)
for _ in range(6):  # the heap settles (small blocks may first take a freed result's place)
  f(x).block_until_ready()
faults = []
for _ in range(11):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[5])
"""


def _median_faults(setting: str | None) -> tuple[str, int]:
  """(whether the settings applied, the median minor page faults of one call)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", host_memory.MALLOC_ENV)}
  if setting is not None:
    env[host_memory.MALLOC_ENV] = setting
  result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
  applied, faults = result.stdout.split()[-2:]
  return applied, int(faults)


def test_freed_buffers_are_reused_without_page_faults():
  applied, reused = _median_faults(None)
  assert applied == "True"
  system_applied, system = _median_faults("system")
  assert system_applied == "False"
  # glibc's defaults map and fault the 64 MiB result at every call (16384 pages of 4
  # KiB); reused memory does not fault at a typical call (now and then a call still
  # maps fresh memory, hence the median).
  assert system >= 16000, system
  assert reused < 1000, reused


def test_a_bad_setting_is_named(monkeypatch):
  monkeypatch.setenv(host_memory.MALLOC_ENV, "jemalloc")
  with pytest.raises(ValueError, match="DIFFUSION_JAX_MALLOC='jemalloc'.*'reuse'.*'system'"):
    host_memory.reuse_freed_memory()
