"""Where evaluation results go: atomic files, job manifests, JSON summaries, clu writers.

Layout under the workdir:
  eval/<job dir>/manifest.json   the settings a resumable job's partial results belong to
  eval/<name>_step<step>.json     one JSON summary per evaluation
and the scalars of every summary go through clu's default metric writer (TensorBoard under
`<workdir>/eval`, only process 0 writes).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping

from clu import metric_writers
import jax
import numpy as np

EVAL_DIR = "eval"


def is_writer() -> bool:
  """Whether this process writes shared files (process 0)."""
  return jax.process_index() == 0


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  """Writes an .npz under a temporary name and renames it: a file is complete or absent."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON under a temporary name and renames it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_json)
  os.replace(tmp, path)


def _to_json(value: Any) -> Any:
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def check_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """Ties a directory of partial results to the settings that produced them.

  Writes `manifest.json` when absent; when present it must equal `manifest`, so a resumed
  job never mixes results of different settings. Nothing is deleted.

  Raises:
    ValueError: naming the differing settings and the way out.
  """
  path = os.path.join(directory, "manifest.json")
  normal = json.loads(json.dumps(dict(manifest), sort_keys=True, default=_to_json))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != normal:
      keys = sorted(set(saved) | set(normal))
      diffs = [f"  {k}: existing {saved.get(k)!r}, now {normal.get(k)!r}" for k in keys
               if saved.get(k) != normal.get(k)]
      raise ValueError(f"{directory} holds partial results of other settings:\n"
                       + "\n".join(diffs) + "\nUse the same settings to resume, or move "
                       "that directory away to start over. Nothing was changed.")
    return
  if is_writer():
    write_json_atomic(path, normal)


def write_summary(workdir: str, name: str, step: int, summary: Dict[str, Any]) -> str:
  """Writes `eval/<name>_step<step>.json` and the numeric entries to clu's writer.

  The written summary's `summary_json` entry is this file's own path (whatever `summary`
  held there, e.g. the path of another job's summary it was built from).

  Returns:
    The JSON path.
  """
  path = os.path.join(workdir, EVAL_DIR, f"{name}_step{step}.json")
  if not is_writer():
    return path
  write_json_atomic(path, {**summary, "summary_json": path})
  scalars = {f"{name}/{k}": float(v) for k, v in summary.items()
             if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
  writer = metric_writers.create_default_writer(os.path.join(workdir, EVAL_DIR),
                                                just_logging=not is_writer())
  writer.write_scalars(step, scalars)
  writer.flush()
  writer.close()
  return path
