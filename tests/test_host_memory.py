"""`host_memory.reuse_freed_memory`: freed host buffers are reused, not page-faulted anew.

Each check runs in a fresh process (malloc settings are process-wide and must precede the
first allocations of JAX's threads): a jitted program whose 64 MiB result XLA allocates
at every call (and frees when Python drops it), counted in minor page faults over three
calls.
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
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str | None) -> tuple[str, int]:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host_memory.MALLOC_ENV)}
  if setting is not None:
    env[host_memory.MALLOC_ENV] = setting
  result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
  applied, faults = result.stdout.split()[-2:]
  return applied, int(faults)


def test_freed_buffers_are_reused_without_page_faults():
  applied, reused = _faults(None)
  assert applied == "True"
  system_applied, system = _faults("system")
  assert system_applied == "False"
  # glibc's defaults map and fault the 64 MiB result at every call (16k pages each);
  # reused memory faults (almost) never.
  assert system > 3 * 16384 * 0.9, system
  assert reused < 0.05 * system, (reused, system)


def test_a_bad_setting_is_named(monkeypatch):
  monkeypatch.setenv(host_memory.MALLOC_ENV, "jemalloc")
  with pytest.raises(ValueError, match="DIFFUSION_JAX_MALLOC='jemalloc'.*'reuse'.*'system'"):
    host_memory.reuse_freed_memory()
