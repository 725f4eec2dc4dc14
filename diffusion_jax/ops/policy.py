"""The kernel policy: which `Ops` a program uses, decided once from the config and the mesh.

`model.kernels` in the config:
  xla     the pure-JAX operations (`ops.reference`): the reference, and what runs on TPU
          and GPU. No compiler options.
  native  the CPU backend (`diffusion_jax.backends.cpu`: oneDNN and Winograd
          convolutions, compiled GroupNorm and dropout kernels, run per device shard, and
          XLA:CPU compiler options). Only on CPU; an error where it cannot be built.
  auto    native on a CPU where the backend builds, else xla (the default).

The decision depends on the platform of the mesh's devices and on whether the compiled
library builds, never on the number of devices: the CPU kernels run per shard of the
batch (see `backends.cpu.per_shard`), so a program on 1 device and on 8 uses the same
kernels and draws the same dropout masks.
"""

from __future__ import annotations

from absl import logging
from jax.sharding import Mesh
import ml_collections

from diffusion_jax.ops import reference
from diffusion_jax.ops.interface import Ops

POLICIES = ("auto", "xla", "native")

XLA = Ops(name="xla", conv3x3=reference.conv3x3, conv1x1=reference.conv1x1,
          group_norm=reference.group_norm, dropout=reference.dropout,
          description="pure-JAX operations (XLA's convolutions, GroupNorm and dropout)")

_warned: set[str] = set()


def check_policy(policy: str) -> None:
  """Raises ValueError naming the choices for an unknown policy."""
  if policy not in POLICIES:
    raise ValueError(f"model.kernels={policy!r}; use one of {POLICIES} ('auto': the CPU "
                     f"backend's kernels on a CPU where they build, else 'xla').")


def platform_of(mesh: Mesh) -> str:
  """The platform ("cpu", "gpu", "tpu") of the mesh's devices."""
  return mesh.devices.flat[0].platform


def resolve(policy: str, mesh: Mesh, *, winograd: bool = True,
            cpu_compiler_options: bool = True) -> Ops:
  """The operations of programs over `mesh` under `policy`.

  Args:
    policy: "auto", "xla" or "native".
    mesh: the data-parallel mesh the programs run on.
    winograd: (native) compute the 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3)
      where it pays (`backends.cpu.conv`).
    cpu_compiler_options: (native) compile with the XLA:CPU options of
      `backends.cpu.compiler_options`.

  Raises:
    ValueError: an unknown policy, or "native" off CPU or where the CPU backend cannot be
      built (the message says why and what to do).
  """
  check_policy(policy)
  if policy == "xla":
    return XLA
  platform = platform_of(mesh)
  if platform != "cpu":
    if policy == "native":
      raise ValueError(f"model.kernels='native' is the CPU backend, but this program runs on "
                       f"{platform}; use model.kernels=auto or xla.")
    return XLA
  from diffusion_jax.backends import cpu  # pylint: disable=g-import-not-at-top
  reason = cpu.unavailable_reason()
  if reason is not None:
    if policy == "native":
      raise ValueError(f"model.kernels='native': the CPU backend cannot be built here: "
                       f"{reason}. Use model.kernels=xla (or auto, which falls back to it).")
    if reason not in _warned:
      _warned.add(reason)
      logging.warning("model.kernels=auto: the CPU backend's kernels are unavailable (%s); "
                      "using the pure-JAX operations (slower on CPU). Set "
                      "model.kernels=xla to choose them without this warning.", reason)
    return XLA
  return cpu.make_ops(mesh, winograd=bool(winograd),
                      compiler_options=bool(cpu_compiler_options))


def from_config(config: ml_collections.ConfigDict, mesh: Mesh) -> Ops:
  """`resolve` with the config's `model.kernels` and `cpu` settings."""
  cpu_config = config.get("cpu") or {}
  return resolve(str(config.model.get("kernels", "auto")), mesh,
                 winograd=bool(cpu_config.get("winograd", True)),
                 cpu_compiler_options=bool(cpu_config.get("compiler_options", True)))
