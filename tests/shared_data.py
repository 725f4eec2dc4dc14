"""Where the real data files of the project's shared folder are: `<repo>/../shared/data`.

The MNIST and CIFAR10-subset `.npz` files lie beside every checkout (developers' and
CI's). A missing folder is an error with the fix, never a silent skip.
"""

import os

DATA_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"))
MNIST = os.path.join(DATA_DIR, "mnist.npz")
CIFAR = os.path.join(DATA_DIR, "cifar10_train_first4000.npz")

if not os.path.isfile(MNIST) or not os.path.isfile(CIFAR):
  raise FileNotFoundError(
      f"The tests read the real MNIST and CIFAR10-subset files from {DATA_DIR} "
      "(mnist.npz, cifar10_train_first4000.npz): the shared folder must lie beside the "
      "repository checkout.")
