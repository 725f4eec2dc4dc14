"""The failing checkpoint writer's own reports are dropped; other errors are kept."""

import asyncio
import gc
import logging

from diffusion_jax.training import write_failures

# A coroutine whose code lives in an ".../orbax/..." file, as orbax's writers do.
_ORBAX_SOURCE = "async def write():\n  raise ValueError('OUT_OF_RANGE: File too large')\n"
_OTHER_SOURCE = "async def work():\n  raise ValueError('some other failure')\n"


def _never_retrieved(source: str, filename: str, name: str) -> None:
  """Runs a task that fails and is never awaited, then lets asyncio report it."""
  scope = {}
  exec(compile(source, filename, "exec"), scope)  # pylint: disable=exec-used
  loop = asyncio.new_event_loop()
  try:
    task = loop.create_task(scope[name]())
    loop.run_until_complete(asyncio.sleep(0.01))
    assert task.done()
  finally:
    loop.close()
  del task
  gc.collect()  # asyncio logs "Task exception was never retrieved" when the task dies.


def test_orbax_task_failures_are_dropped_and_others_kept(caplog):
  write_failures.quiet_writer_errors()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _never_retrieved(_ORBAX_SOURCE, "/site-packages/orbax/checkpoint/fake.py", "write")
    _never_retrieved(_OTHER_SOURCE, "/site-packages/project/fake.py", "work")
  messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
  assert len(messages) == 1, messages
  assert "never retrieved" in messages[0] and "project" in messages[0]


def test_describe_reads_tensorstore_text():
  error = ValueError('OUT_OF_RANGE: Error writing "x" in OCDBT database at local file '
                     '"/w/ckpt/": Failed writing: "/w/ckpt/d/abc": Failed to write 8 bytes '
                     "to file 14: File too large [os_error_code='27']")
  path, number, cause = write_failures.describe(error, "/w")
  assert (path, number) == ("/w/ckpt/d/abc", 27)
  assert cause == "File too large"
