"""The reproduce listing: every command parses against the real flags and configs, names
registered jobs and existing tools, and the published figures are the papers'."""

import contextlib
import importlib.util
import io
import json
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from diffusion_jax import sampling
from diffusion_jax.convert import released_models
from diffusion_jax.evaluation import modes
from diffusion_jax.tools import reproduce


def _parse_main(command):
  """(mode, config) of a `python -m diffusion_jax.main ...` command, its --config and
  --config.* overrides parsed by ml_collections' config flag, as main parses them."""
  args = iter(shlex.split(command)[3:])
  mode, argv = "train", ["main"]
  for arg in args:
    if arg.startswith("--mode="):
      mode = arg.split("=", 1)[1]
    elif arg == "--config":
      argv += [arg, next(args)]
    elif arg.startswith("--config."):
      argv.append(arg)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return mode, values.config


def test_every_command_parses_and_names_real_jobs_and_tools():
  commands = list(reproduce.SETUP) + [c for r in reproduce.rows() for c in r.commands]
  checked = 0
  for command in commands:
    words = shlex.split(command.split("&&")[-1].strip())
    if words[:3] == ["python", "-m", "diffusion_jax.main"]:
      mode, config = _parse_main(command)
      assert mode == "train" or mode in modes.MODES, command
      sampling.check_sampler(config)  # the sampler settings exist and fit
      checked += 1
    elif words[:2] == ["python", "-m"]:
      assert importlib.util.find_spec(words[2]) is not None, command
      if words[2].endswith("import_checkpoint"):
        src = words[words.index("--src") + 1]
        assert src in released_models.RELEASED
  assert checked >= 20


def test_rows_carry_the_published_figures():
  rows = reproduce.rows()
  text = {f"{r.group} | {r.name}": r.published for r in rows}
  assert "FID 3.17" in text["DDPM Table 1 | Ours (L_simple): IS and FID"]
  assert "5.24" in text["DDPM Table 1 | Ours (L_simple): IS and FID"]
  assert text["DDPM Table 1 | Ours (L_simple): NLL, test"] == "<= 3.75 bits/dim"
  ddim = [r.published for r in rows if r.group == "DDIM Table 1"]
  assert ddim == ["FID 13.36", "FID 6.84", "FID 4.67", "FID 4.16"]
  assert [r.published for r in rows if r.group == "DPM-Solver"] == ["FID 4.65"]
  table2 = [r for r in rows if r.group == "DDPM Table 2"]
  assert len(table2) == 6 and sum("unstable" in r.published for r in table2) == 2
  assert any("3.28" in r.published for r in rows if r.group == "Likelihood")


def test_command_line_filters_and_prints_json():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert reproduce.main(["--row", "ddim", "--json"]) == 0
  data = json.loads(out.getvalue())
  assert len(data["rows"]) == 4 and data["setup"] == list(reproduce.SETUP)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    reproduce.main(["--row", "dpm-solver"])
  assert "--config.sampling.num_steps=12" in out.getvalue()
  with pytest.raises(ValueError, match="No row matches"):
    reproduce.main(["--row", "imagenet"])
