"""`backends.cpu.host_memory.reuse_freed_memory`: freed host buffers are reused, not
page-faulted anew.

The page-fault check runs in fresh processes (malloc settings are process-wide and must
precede the first allocations of JAX's threads): a jitted program whose 64 MiB result XLA
allocates at every call (and frees when Python drops it), its minor page faults counted
per call, once with the settings and once with glibc's defaults. The other checks call it
where it must refuse, which changes nothing. Pure ctypes: no compiled library needed.
"""

import os
import resource
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax.backends.cpu import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROGRAM = """
import ctypes, resource, sys
# Transparent huge pages would cut the faults of glibc's defaults by 512x on hosts that
# enable them for all memory: count in base pages.
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
from diffusion_jax.backends.cpu import host_memory
print(host_memory.reuse_freed_memory() if sys.argv[1] == "reuse" else "defaults")
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(jnp.outer(x, x)))  # a 64 MiB result, freed after each call
x = jnp.linspace(0, 1, 4096)
# The heap settles: for the first calls small blocks may take a piece of a freed result's
# place, and the next result then extends the heap (fresh pages) until the holes suffice.
for _ in range(30):
  f(x).block_until_ready()
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults)[7])
"""
RESULT_PAGES = 64 * 2**20 // resource.getpagesize()


def _median_faults(mode: str) -> tuple[str, int]:
  """(what the program printed of the settings, the median minor page faults of one
  call) for mode "reuse" (the settings first) or "defaults" (glibc's own)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=True)
  applied, faults = result.stdout.split()[-2:]
  return applied, int(faults)


@pytest.mark.skipif(host_memory.glibc_mallopt() is None,
                    reason="glibc's own malloc only (not musl, macOS or an LD_PRELOAD one)")
def test_freed_buffers_are_reused_without_page_faults():
  applied, reused = _median_faults("reuse")
  assert applied == "True"
  _, system = _median_faults("defaults")
  # glibc's defaults map and fault the 64 MiB result at every call (16384 pages of 4
  # KiB); reused memory does not fault at a typical call (now and then a call still
  # maps fresh memory, hence the median).
  assert system >= 0.95 * RESULT_PAGES, system
  assert reused < 0.05 * RESULT_PAGES, reused


def test_too_late_is_refused_with_a_warning(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  jax.block_until_ready(jnp.ones(4) + 1)  # JAX has computed in this process
  if host_memory.glibc_mallopt() is None:
    pytest.skip("glibc's own malloc only: elsewhere it refuses before looking at JAX")
  with mock.patch.object(host_memory.logging, "warning") as warning:
    assert host_memory.reuse_freed_memory() is False
  assert "after JAX started" in warning.call_args[0][0]


def test_accelerator_hosts_are_left_alone(monkeypatch):
  for platforms, accelerator in (("cuda", True), ("tpu,cpu", True), ("cpu", False),
                                 ("CPU,cuda", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory.accelerator_host() is accelerator, platforms
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  with mock.patch.object(host_memory, "glibc_mallopt") as mallopt:
    assert host_memory.reuse_freed_memory() is False
  mallopt.assert_not_called()  # refused before touching malloc


def test_another_malloc_is_left_alone(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(host_memory, "glibc_mallopt", lambda: None)
  with mock.patch.object(host_memory.logging, "warning") as warning:
    assert host_memory.reuse_freed_memory() is False
  warning.assert_not_called()
