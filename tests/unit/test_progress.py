"""Time-left estimates of the long jobs."""

from diffusion_jax import progress


def test_format_duration():
  assert progress.format_duration(42.4) == "42s"
  assert progress.format_duration(185) == "3m05s"
  assert progress.format_duration(3720) == "1h02m"
  assert progress.format_duration(-5) == "0s"


def test_time_left_uses_this_runs_rate():
  assert progress.time_left(done=10, remaining=30, elapsed=20.0) == "ETA 1m00s"
  assert progress.time_left(done=0, remaining=30, elapsed=0.0) == "ETA unknown"
  assert progress.time_left(done=5, remaining=0, elapsed=9.0) == "ETA 0s"
