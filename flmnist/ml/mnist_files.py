"""Where MNIST lives and whether its four raw files are sound, without PyTorch: the ``flmnist``
command checks them before Flower starts; a download runs in a child process
(:mod:`flmnist.ml.download`, torchvision's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flmnist.core.errors import DataError

FAILED = "download failed: "  # how flmnist.ml.download starts its last line when it fails

MNIST_FILES = {
    # name: (magic number, number of items)
    "train-images-idx3-ubyte": (2051, 60_000),
    "train-labels-idx1-ubyte": (2049, 60_000),
    "t10k-images-idx3-ubyte": (2051, 10_000),
    "t10k-labels-idx1-ubyte": (2049, 10_000),
}


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
    if missing and any((root / name).is_file() for name in MNIST_FILES):  # the files' own folder was named
        parent = root.parent.parent if root.name == "raw" and root.parent.name == "MNIST" else None
        raise DataError(f"MNIST not found under {root}: it holds the files themselves, but flmnist looks in "
                        f"ROOT/MNIST/raw/; set data.root or FLMNIST_DATA_DIR to "
                        f"{parent if parent is not None else 'a folder holding MNIST/raw/'}")
    if missing and download not in (False, "false"):
        created = [d for d in (root, root / "MNIST", folder) if not d.exists()]
        print(f"flmnist: MNIST is missing from {folder}: downloading it with torchvision", flush=True)
        # In a child process: torchvision's import (and PyTorch's) stays out of the flmnist command.
        child = subprocess.run([sys.executable, "-m", "flmnist.ml.download", str(root)], stdout=None,
                               stderr=subprocess.PIPE, text=True, check=False)
        if child.returncode != 0:
            for d in reversed(created):  # leave nothing behind: the folders the download made, if still empty
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            lines = child.stderr.strip().splitlines() or ["no message"]
            reason = " ".join(lines[-1].removeprefix(FAILED).split())[:300]
            raise DataError(f"MNIST is missing from {folder} and the download failed ({reason}). {place}")
        missing = [name for name in MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"MNIST not found: {folder} lacks {', '.join(missing)} (data.download=false). {place}")
    for name in MNIST_FILES:
        check_file(folder / name)
    return folder
