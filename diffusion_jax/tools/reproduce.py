"""The published CIFAR10 numbers, row by row, with the commands that reproduce them here.

  python -m diffusion_jax.tools.reproduce            # every row
  python -m diffusion_jax.tools.reproduce --row ddim # rows whose name contains "ddim"
  python -m diffusion_jax.tools.reproduce --json     # machine-readable

Rows: DDPM (Ho et al. 2020) Table 1 and Table 2 (CIFAR10), DDIM (Song et al. 2021)
Table 1 (CIFAR10, eta = 0), DPM-Solver (Lu et al. 2022) at 12 network calls, and the
likelihood figures the bits/dim job compares with. The commands need an accelerator (50k
samples x 1000 steps, 800k training steps) and the internet (tfds downloads CIFAR10;
the released model and pytorch-fid's Inception weights are downloaded once). The protocol
of every FID: 50,000 samples from the EMA parameters, TF-Inception pool3 (converted),
against the training set (`fid`, the papers' figure) and the test set (`fid_test`) in
the same job; IS from the same network's classifier (10 splits).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from diffusion_jax import cli

CONFIG = "configs/cifar10.py"
INCEPTION = "workdirs/inception_fid_is.npz"
OFFICIAL = "workdirs/cifar10_official"
MAIN = "python -m diffusion_jax.main"
PYTORCH_FID_WEIGHTS = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                       "fid_weights/pt_inception-2015-12-05-6726825d.pth")

SETUP = (
    "pip install -e . && pip install torch  # torch reads the Inception weights once",
    f"mkdir -p workdirs && wget -O workdirs/pt_inception.pth {PYTORCH_FID_WEIGHTS}",
    "python -m diffusion_jax.tools.convert_inception --src workdirs/pt_inception.pth "
    f"--out {INCEPTION}",
    "python -m diffusion_jax.tools.import_checkpoint --src google/ddpm-cifar10-32 "
    f"--workdir {OFFICIAL}",
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One published figure and how to measure it here."""
  group: str
  name: str
  published: str
  source: str
  commands: tuple[str, ...]
  reads: str  # which summary entries to read
  note: str = ""


def _fid(workdir: str, *overrides: str) -> str:
  return " ".join((f"{MAIN} --mode=eval_fid --config {CONFIG} --workdir {workdir}",
                   f"--config.eval.inception_weights={INCEPTION}", *overrides))


def _train(workdir: str, *overrides: str) -> str:
  return " ".join((f"{MAIN} --config {CONFIG} --workdir {workdir}", *overrides))


def _table2_rows() -> Dict[str, tuple]:
  """`TABLE2_ROWS` of configs/cifar10.py (row -> (overrides, "IS / FID"))."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  path = os.path.join(root, CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: run from a checkout of the repository.")
  spec = importlib.util.spec_from_file_location("cifar10_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TABLE2_ROWS


def _slug(text: str) -> str:
  keep = "".join(c if c.isalnum() else "_" for c in text.lower())
  return "_".join(part for part in keep.split("_") if part)[:40]


def rows() -> List[Row]:
  """Every row, in the papers' order."""
  ddpm = "Ho et al. 2020, Table 1"
  out = [
      Row("DDPM Table 1", "Ours (L_simple): IS and FID",
          "IS 9.46 +- 0.11, FID 3.17 (train statistics), 5.24 (test statistics)", ddpm,
          (_fid(OFFICIAL),), "inception_score, fid (train), fid_test",
          "The official EMA checkpoint re-measured by others: FID 3.25 (TF) / 3.21 "
          "(PyTorch) against the training set. To train the model instead: "
          + _train("workdirs/cifar10") + " (800k steps), then the same command on "
          "workdirs/cifar10."),
      Row("DDPM Table 1", "Ours (L_simple): NLL, test", "<= 3.75 bits/dim", ddpm,
          (f"{MAIN} --mode=eval_bpd --config {CONFIG} --workdir {OFFICIAL}",),
          "total_bpd (test split, all 1000 terms, x_0 clipped as the official code)"),
      Row("DDPM Table 1", "Ours (L_simple): NLL, train", "<= 3.72 bits/dim", ddpm,
          (f"{MAIN} --mode=eval_bpd --config {CONFIG} --workdir {OFFICIAL} "
           "--config.eval.bpd_split=train",), "total_bpd (train split)"),
      Row("DDPM Table 1", "Ours (L, fixed isotropic Sigma)",
          "IS 7.67, FID 13.51, NLL <= 3.70 bits/dim", ddpm,
          (_train("workdirs/cifar10_vlb", "--config.diffusion.loss_type=kl"),
           _fid("workdirs/cifar10_vlb", "--config.diffusion.loss_type=kl"),
           f"{MAIN} --mode=eval_bpd --config {CONFIG} --workdir workdirs/cifar10_vlb "
           "--config.diffusion.loss_type=kl"),
          "inception_score, fid; total_bpd"),
  ]
  for name, (overrides, figure) in _table2_rows().items():
    workdir = f"workdirs/cifar10_t2_{_slug(name)}"
    out.append(Row("DDPM Table 2", name, f"IS / FID {figure}", "Ho et al. 2020, Table 2",
                   (_train(workdir, *overrides), _fid(workdir, *overrides)),
                   "inception_score, fid",
                   "unstable: training diverges in the paper" if figure == "unstable"
                   else ""))
  ddim = {10: "13.36", 20: "6.84", 50: "4.67", 100: "4.16"}
  for steps, figure in ddim.items():
    out.append(Row(
        "DDIM Table 1", f"eta = 0, {steps} steps (quadratic timesteps)", f"FID {figure}",
        "Song et al. 2021, Table 1 (CIFAR10, the DDPM checkpoint)",
        (_fid(OFFICIAL, "--config.sampling.sampler=ddim", "--config.sampling.spacing=quad",
              f"--config.sampling.num_steps={steps}", "--config.sampling.eta=0.0",
              "--config.sampling.clip_denoised=False"),),
        "fid (train statistics)",
        "DDIM's code does not clip x_0; the quadratic grid drops repeated timesteps (49 "
        "and 96 network calls at 50 and 100 steps)." if steps >= 50 else
        "DDIM's code does not clip x_0."))
  out.append(Row(
      "DPM-Solver", "12 network calls on the discrete-time DDPM", "FID 4.65",
      "Lu et al. 2022, Section 5.2",
      (_fid(OFFICIAL, "--config.sampling.sampler=dpm_3s",
            "--config.sampling.num_steps=12", "--config.sampling.spacing=dpm_fast",
            "--config.sampling.solver_type=lu", "--config.sampling.final_step=t0",
            "--config.sampling.clip_denoised=False"),),
      "fid (train statistics)",
      "DPM-Solver-fast as Lu et al.'s code for discrete DPMs: DPM-Solver-3 singlestep, "
      "outer steps uniform in log-SNR (orders 3, 3, 3, 2, 1), ending at timestep 0, no "
      "clipping."))
  out.append(Row(
      "Likelihood", "Probability-flow ODE bits/dim (uniform dequantization)",
      "3.28 bits/dim (score_sde's retrained DDPM, not the released weights)",
      "score_sde README",
      (f"{MAIN} --mode=eval_bpd --config {CONFIG} --workdir {OFFICIAL} "
       "--config.eval.bpd_ode=True",),
      "ode_bpd (test split; ode_offset_bpd is the +7 of the dequantization)",
      "A different network than the released one: compare the protocol, not the digits."))
  out.append(Row(
      "Likelihood", "Analytic-DPM bound (T and K-step chains)",
      "not quoted here: see Bao et al. 2022 for their CIFAR10 figures", "Bao et al. 2022",
      (f"{MAIN} --mode=eval_analytic --config {CONFIG} --workdir {OFFICIAL}",
       f"{MAIN} --mode=eval_bpd --config {CONFIG} --workdir {OFFICIAL} "
       "--config.eval.bpd_analytic=True --config.eval.bpd_chain_steps='(10, 25, 50, 100)'"),
      "analytic_total_bpd and chains[] (fixedsmall/fixedlarge/analytic per K)"))
  return out


def format_text(selected: Sequence[Row]) -> str:
  """The rows as text: setup once, then per row the figure and its commands."""
  lines = ["# Setup (once)"] + list(SETUP) + [""]
  for row in selected:
    lines.append(f"# {row.group} | {row.name}")
    lines.append(f"#   published: {row.published} ({row.source})")
    lines.append(f"#   read: {row.reads}")
    if row.note:
      lines.append(f"#   note: {row.note}")
    lines.extend(row.commands)
    lines.append("")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--row", default="", help="only rows whose group or name contains "
                      "this text (case-insensitive)")
  parser.add_argument("--json", action="store_true", help="print JSON")
  args = parser.parse_args(argv)
  needle = args.row.lower()
  selected = [r for r in rows() if needle in f"{r.group} {r.name}".lower()]
  if not selected:
    raise ValueError(f"No row matches {args.row!r}; run without --row to list them.")
  if args.json:
    print(json.dumps({"setup": list(SETUP),
                      "rows": [dataclasses.asdict(r) for r in selected]}, indent=2))
  else:
    print(format_text(selected))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argv(main))
