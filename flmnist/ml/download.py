"""``python -m flmnist.ml.download ROOT``: download MNIST's four raw files into ``ROOT/MNIST/raw``
with torchvision (run by :func:`flmnist.ml.mnist_files.ensure_mnist` as a child process)."""

from __future__ import annotations

import sys

from torchvision.datasets import MNIST

from flmnist.ml.mnist_files import FAILED


def download(root: str) -> None:
    MNIST(root, train=True, download=True)
    MNIST(root, train=False, download=True)


if __name__ == "__main__":
    try:
        download(sys.argv[1])
    except Exception as err:  # noqa: BLE001 - network errors come in many types; the parent says what to do
        print(FAILED + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(1)
