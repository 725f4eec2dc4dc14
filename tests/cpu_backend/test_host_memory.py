"""`host_memory.reuse_freed_memory`: freed host buffers are reused, not page-faulted anew.

The page-fault check runs in fresh processes (malloc settings are process-wide and must
precede the first allocations of JAX's threads): a jitted program whose 64 MiB result XLA
allocates at every call (and frees when Python drops it), its minor page faults counted
per call. The other checks call it where it must refuse, which changes nothing.
"""

import os
import resource
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = """
import ctypes, resource, sys
# Transparent huge pages would cut the faults of glibc's defaults by 512x on hosts that
# enable them for all memory: count in base pages.
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
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
RESULT_PAGES = 64 * 2**20 // resource.getpagesize()


def _median_faults(setting: str | None) -> tuple[str, int]:
  """(whether the settings applied, the median minor page faults of one call)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", host_memory.MALLOC_ENV)}
  env["JAX_PLATFORMS"] = "cpu"
  if setting is not None:
    env[host_memory.MALLOC_ENV] = setting
  result = subprocess.run([sys.executable, "-c", PROGRAM], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
  applied, faults = result.stdout.split()[-2:]
  return applied, int(faults)


@pytest.mark.skipif(host_memory._glibc_malloc() is None,
                    reason="glibc's own malloc only (not musl, macOS or an LD_PRELOAD one)")
def test_freed_buffers_are_reused_without_page_faults():
  applied, reused = _median_faults(None)
  assert applied == "True"
  system_applied, system = _median_faults("system")
  assert system_applied == "False"
  # glibc's defaults map and fault the 64 MiB result at every call (16384 pages of 4
  # KiB); reused memory does not fault at a typical call (now and then a call still
  # maps fresh memory, hence the median).
  assert system >= 0.95 * RESULT_PAGES, system
  assert reused < 0.05 * RESULT_PAGES, reused


def test_too_late_is_refused_with_a_warning(monkeypatch):
  monkeypatch.delenv(host_memory.MALLOC_ENV, raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  jax.block_until_ready(jnp.ones(4) + 1)  # JAX has computed in this process
  with mock.patch.object(host_memory.logging, "warning") as warning:
    assert host_memory.reuse_freed_memory() is False
  assert "after JAX started" in warning.call_args[0][0]
  assert not host_memory.applied()


def test_accelerator_hosts_are_left_alone(monkeypatch):
  monkeypatch.delenv(host_memory.MALLOC_ENV, raising=False)
  for platforms, accelerator in (("cuda", True), ("tpu,cpu", True), ("cpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory._accelerator_host() is accelerator
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert host_memory.reuse_freed_memory() is False


def test_a_bad_setting_is_named(monkeypatch):
  monkeypatch.setenv(host_memory.MALLOC_ENV, "jemalloc")
  with pytest.raises(ValueError, match="DIFFUSION_JAX_MALLOC='jemalloc'.*'reuse'.*'system'"):
    host_memory.reuse_freed_memory()
