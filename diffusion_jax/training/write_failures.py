"""Failed checkpoint writes: one error naming the path, the errno and the cause, and
quiet writer threads.

A save that fails inside orbax (no space, quota, permission, I/O error) would otherwise
surface as hundreds of tracebacks around the one line that matters: orbax's writer
threads log each failure with its traceback, and tensorstore's late completions report
"Event loop is closed" through `sys.unraisablehook`. `quiet_writer_errors` silences both
(the `Checkpointer` raises the failure itself, once), and `describe` extracts the path
and errno from the exception chain (tensorstore reports file errors as text).
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (the message names the path, errno and what is
  kept)."""

  def __init__(self, message: str, errno: int | None = None, path: str | None = None):
    super().__init__(message)
    self.message, self.errno, self.filename = message, errno, path

  def __str__(self) -> str:
    return self.message


class _WriterLogFilter(py_logging.Filter):
  """Drops the tracebacks that orbax's writer threads log when a save fails (also after
  the save call has returned): the Checkpointer raises the failure once, with its cause,
  and reports unreadable checkpoints itself. asyncio reports the same failures once more
  when orbax's write tasks are collected ("Task exception was never retrieved", naming
  the orbax coroutine); those reports are dropped too."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR:
      return True
    orbax = f"{os.sep}orbax{os.sep}"
    if orbax in record.pathname:
      return False
    return not (record.name == "asyncio" and orbax in record.getMessage())


def _install_log_filter() -> None:
  """Installs `_WriterLogFilter` on absl's and asyncio's loggers (once per process)."""
  for name in ("absl", "asyncio"):
    logger = py_logging.getLogger(name)
    if not any(isinstance(f, _WriterLogFilter) for f in logger.filters):
      logger.addFilter(_WriterLogFilter())


def _drop_closed_loop_callbacks() -> None:
  """Keeps the writer's late callbacks quiet after a failed save.

  When a write fails, orbax's event loop closes while tensorstore still completes the
  other writes; each completion then reports "Event loop is closed" through
  `sys.unraisablehook` (hundreds of tracebacks around the one line that matters). Those
  exact reports are dropped; everything else reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop_callbacks", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def describe(error: BaseException, directory: str) -> tuple[str, int | None, str]:
  """(path, errno, cause) of a failed write, from the exception chain.

  tensorstore reports its file errors as text ('Failed writing: "<path>": ... [os_error_
  code='27']'); Python's OSError carries them as attributes.
  """
  chain, seen = [], error
  while seen is not None and len(chain) < 16:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno is not None:
      return (e.filename or directory, e.errno, e.strerror or os.strerror(e.errno))
  text = " ".join(str(e) for e in chain)
  code = re.search(r"os_error_code='?(\d+)", text)
  path = (re.search(r'Failed (?:writing|to write|opening|creating|renaming)\w*:? "([^"]+)"',
                    text) or re.search(r'local file "([^"]+)"', text))
  number = int(code.group(1)) if code else None
  cause = os.strerror(number) if number else (str(error).splitlines() or ["unknown"])[0]
  return (path.group(1) if path else directory), number, cause


def quiet_writer_errors() -> None:
  """Silences the failing writer's own reports (once per process; see the module)."""
  _install_log_filter()
  _drop_closed_loop_callbacks()
