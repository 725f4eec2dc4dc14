"""Progress of long jobs: the time left, from the rate of the current run."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
  """Seconds as `1h02m`, `3m05s` or `42s`."""
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def time_left(done: int, remaining: int, elapsed: float) -> str:
  """`ETA ...` for `remaining` units at the rate of the `done` units of `elapsed` seconds.

  Args:
    done: units finished by this run (not counting work found already done).
    remaining: units still to do.
    elapsed: seconds this run has spent on the `done` units.
  """
  if remaining <= 0:
    return "ETA 0s"
  if done <= 0 or elapsed <= 0:
    return "ETA unknown"
  return "ETA " + format_duration(remaining * elapsed / done)
