"""Checks a checkpoint's variables against the configured architecture before any use.

Every converter builds the table of variables the architecture needs ({name: shape}) and
the table the file holds, and calls `check_variables`: a missing variable, an unused one
or a shape mismatch raises `CheckpointMismatchError` naming the first offenders with both
shapes, before anything is converted or written.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.traverse_util
import numpy as np

Shape = tuple[int, ...]

_SHOW = 5  # How many offenders of each kind an error message lists.


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the configured architecture (names or shapes)."""


def _listing(items: Sequence[str]) -> str:
  shown = ", ".join(items[:_SHOW])
  more = len(items) - _SHOW
  return shown + (f" (and {more} more)" if more > 0 else "")


def check_variables(expected: Mapping[str, Shape], found: Mapping[str, Shape], *,
                    source: str, hint: str = "") -> None:
  """Raises unless `found` has exactly the names of `expected`, with the same shapes.

  Args:
    expected: the variables the architecture needs, {name: shape}, in model order.
    found: the variables of the checkpoint, {name: shape}.
    source: the checkpoint's description for the message (path and format).
    hint: appended to the message (how to fix it).

  Raises:
    CheckpointMismatchError: naming the first mismatching, missing and unused variables.
  """
  problems = []
  mismatched = [f"{name}: checkpoint {tuple(found[name])} vs model {tuple(shape)}"
                for name, shape in expected.items()
                if name in found and tuple(found[name]) != tuple(shape)]
  missing = [f"{name} {tuple(shape)}" for name, shape in expected.items()
             if name not in found]
  unused = [f"{name} {tuple(shape)}" for name, shape in sorted(found.items())
            if name not in expected]
  if mismatched:
    problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
  if missing:
    problems.append(f"{len(missing)} variable(s) missing from the checkpoint: "
                    f"{_listing(missing)}")
  if unused:
    problems.append(f"{len(unused)} checkpoint variable(s) unused by the model: "
                    f"{_listing(unused)}")
  if problems:
    message = (f"The checkpoint {source} does not fit the configured U-Net:\n  - "
               + "\n  - ".join(problems))
    if hint:
      message += "\n" + hint
    raise CheckpointMismatchError(message)


def flatten_params(params: Any) -> dict[tuple[str, ...], Any]:
  """{('down_0', 'block_0', 'conv1', 'kernel'): array, ...} in the tree's key order."""
  return flax.traverse_util.flatten_dict(params)


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """Inverse of `flatten_params`: a nested dict."""
  return flax.traverse_util.unflatten_dict(dict(flat))


def as_float32(name: str, value: Any) -> np.ndarray:
  """A checkpoint tensor as a float32 NumPy array; rejects non-floating types."""
  array = np.asarray(value)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != "bfloat16":
    raise CheckpointMismatchError(
        f"Checkpoint variable {name} has dtype {array.dtype}; expected floating point.")
  return np.ascontiguousarray(array.astype(np.float32))
