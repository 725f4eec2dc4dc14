"""How every command ends on an error: one line on stderr and exit status 1.

User errors (bad settings, missing or corrupt files, a full disk, a non-finite loss) are
the exceptions of `USER_ERRORS`: their message already names the problem and the fix, so
the command prints just that message, on one line, and exits with status 1. Anything else
is a bug and keeps its traceback. `--verbose` (every command has it) keeps the traceback
of user errors too.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

# OSError covers missing files, permissions, a full disk or quota, and I/O errors;
# FloatingPointError a non-finite training loss.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(error: BaseException) -> str:
  """`error`'s message on one line (its lines joined with '; ')."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return "; ".join(lines) or type(error).__name__


def run_argv(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None
             ) -> int:
  """Runs an argparse command's `main(argv)`; user errors become one line and status 1.

  A `--verbose` argument anywhere in argv keeps the traceback (it is removed before
  `main` sees argv).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  verbose = "--verbose" in argv
  argv = [a for a in argv if a != "--verbose"]
  try:
    return main(argv)
  except USER_ERRORS as e:
    if verbose:
      raise
    print(f"error: {one_line(e)}", file=sys.stderr)
    return 1


def absl_main(main: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
  """Wraps an absl `main(argv)`: user errors become one line on stderr and exit status 1
  unless the absl flag `--verbose` is set (define it with `define_verbose_flag`)."""

  def wrapped(argv):
    from absl import flags  # pylint: disable=g-import-not-at-top
    try:
      return main(argv)
    except USER_ERRORS as e:
      if flags.FLAGS.verbose:
        raise
      sys.stderr.flush()
      print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
      sys.exit(1)

  return wrapped


def define_verbose_flag() -> None:
  """Defines the absl flag `--verbose` (keep the traceback of user errors)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "Show the traceback of errors in the input too.")
