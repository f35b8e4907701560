"""MNIST loading: where the files are, checking them, decoding them once per process.

The data root is, in order: the ``data.root`` setting, the ``FLMNIST_DATA_DIR``
environment variable, a per-user cache directory. The root holds torchvision's
layout, ``ROOT/MNIST/raw/<four files>``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flmnist.core.constants import NUM_CLASSES
from flmnist.core.errors import DataError

if TYPE_CHECKING:
    import torch

MNIST_FILES = {
    # name: (magic number, number of items)
    "train-images-idx3-ubyte": (2051, 60_000),
    "train-labels-idx1-ubyte": (2049, 60_000),
    "t10k-images-idx3-ubyte": (2051, 10_000),
    "t10k-labels-idx1-ubyte": (2049, 10_000),
}
MEAN, STD = 0.1307, 0.3081


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The MNIST root: ``root`` if given, else ``$FLMNIST_DATA_DIR``, else the user cache."""
    if root:
        return Path(root).expanduser().resolve()
    env = os.environ.get("FLMNIST_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return (Path(cache) / "flmnist" / "mnist").resolve()


def raw_dir(root: Path) -> Path:
    return root / "MNIST" / "raw"


def check_file(path: Path) -> None:
    """Raise :class:`DataError` naming ``path`` if its magic number or size is wrong."""
    magic, count = MNIST_FILES[path.name]
    item_bytes = 28 * 28 if magic == 2051 else 1
    header = 16 if magic == 2051 else 8
    expected = header + count * item_bytes
    with path.open("rb") as f:
        head = f.read(8)
    found_magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
    if found_magic != magic:
        raise DataError(
            f"Corrupt MNIST file {path}: magic number {found_magic}, expected {magic}. "
            "Replace it with the original (uncompressed) file."
        )
    size = path.stat().st_size
    if size != expected:
        raise DataError(
            f"Corrupt MNIST file {path}: {size} bytes, expected {expected} "
            f"({count} items). Replace it with the original (uncompressed) file."
        )


def ensure_mnist(root: Path, download: bool | str = "auto") -> Path:
    """Check the four raw files under ``root``. Missing ones are downloaded with torchvision
    (progress shown) unless ``download`` is false; a failed download is one error naming the
    folder, the files and how to place them."""
    folder = raw_dir(root)
    missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    place = (f"Put the four files {', '.join(MNIST_FILES)} (uncompressed; from a copy of torchvision's "
             f"MNIST/raw/ folder or the .gz files of the MNIST site, gunzipped) into {folder}, or set "
             "data.root or FLMNIST_DATA_DIR to a folder holding MNIST/raw/.")
    if missing and download not in (False, "false"):
        from torchvision.datasets import MNIST

        print(f"flmnist: MNIST is missing from {folder}: downloading it with torchvision", flush=True)
        try:
            MNIST(str(root), train=True, download=True)
            MNIST(str(root), train=False, download=True)
        except Exception as err:  # network errors come in many types
            reason = " ".join(str(err).split())[:300]
            raise DataError(f"MNIST is missing from {folder} and the download failed ({reason}). {place}") from err
        missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"MNIST not found: {folder} lacks {', '.join(missing)} (data.download=false). {place}")
    for name in MNIST_FILES:
        check_file(folder / name)
    return folder


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], standardised with MNIST's mean and std."""
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


@functools.lru_cache(maxsize=4)
def load_mnist(root: str, train: bool, download: bool | str = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one MNIST split once per process: (images float [N,1,28,28], labels int64 [N]).

    The idx files are read with numpy (the format is a header and raw bytes, checked by
    :func:`check_file`): 0.1 s against 1.5 s through torchvision, whose import alone takes
    1.2 s in every process that loads MNIST."""
    import torch  # here, not at the top: the flmnist command checks MNIST without paying its import

    folder = ensure_mnist(resolve_root(root), download)
    prefix = "train" if train else "t10k"
    images = np.fromfile(folder / f"{prefix}-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(folder / f"{prefix}-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    return normalize(torch.from_numpy(images)), torch.from_numpy(labels).long()


def train_labels(root: str | None, download: bool = False) -> np.ndarray:
    """Training labels as numpy, for partitioning."""
    return load_mnist(str(resolve_root(root)), True, download)[1].numpy()


def load_data_path(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a device's own data directory (``data-path`` node config): ``DIR/data.pt``.

    ``data.pt`` holds ``{"images": uint8 [N, 28, 28], "labels": int64 [N]}``, as
    written by ``jetson/device/export_partition.py``.
    """
    import torch

    folder = Path(path).expanduser()
    file = folder / "data.pt"
    if not file.is_file():
        raise DataError(
            f"data-path {folder}: expected a file data.pt holding "
            "{'images': uint8 [N,28,28], 'labels': int64 [N]}; "
            + ("the folder does not exist" if not folder.is_dir() else "it is not there")
        )
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        images, labels = blob["images"], blob["labels"]
    except Exception as err:
        raise DataError(f"data-path {file}: cannot read it as a data.pt ({err})") from err
    if (
        images.dtype != torch.uint8
        or images.dim() != 3
        or tuple(images.shape[1:]) != (28, 28)
        or labels.dim() != 1
        or len(labels) != len(images)
        or len(labels) == 0
    ):
        raise DataError(
            f"data-path {file}: expected images uint8 [N,28,28] and labels [N] with N > 0, "
            f"got images {images.dtype} {tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"data-path {file}: labels must lie in 0-9")
    return normalize(images), labels.long()
