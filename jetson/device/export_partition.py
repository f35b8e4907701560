"""Write one node's partition of MNIST as ``OUT/data.pt``, the folder a SuperNode's ``data-path`` names.

    python jetson/device/export_partition.py --node 0 --out /srv/flmnist/data experiment=seed002

The split is flmnist's own (``conf/`` composed with the Hydra overrides given, the same
``partition``, ``num_nodes`` and ``seed`` the server uses), so node ``i`` gets exactly the
examples partition ``i`` would hold in simulation. The whole partition is written; the
ClientApp keeps its ``data.holdout_fraction`` share aside for local evaluation itself.
MNIST is read from ``--data-root``, else ``data.root``/``$FLMNIST_DATA_DIR`` as usual.
Run it wherever MNIST is (usually the server) and copy the folder to the board.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from flmnist.config.compose import compose_config
from flmnist.core.build import build
from flmnist.core.errors import FlmnistError
from flmnist.ml.mnist_files import ensure_mnist, resolve_root
from flmnist.ml.partition import label_counts


@functools.lru_cache(maxsize=2)
def raw_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training split as stored: uint8 images [N, 28, 28], int64 labels [N]."""
    from torchvision.datasets import MNIST

    ensure_mnist(root)
    ds = MNIST(str(root), train=True, download=False)
    return ds.data.to(torch.uint8), ds.targets.long()


def export_partition(out: str | os.PathLike, node: int, overrides: list[str] = (),
                     data_root: str | os.PathLike | None = None) -> dict:
    """Write ``out/data.pt`` (and ``out/partition.json`` describing it); return the description."""
    cfg = compose_config(list(overrides))
    if not 0 <= node < cfg.num_nodes:
        raise FlmnistError(f"--node {node} is outside 0..{cfg.num_nodes - 1} (num_nodes={cfg.num_nodes})")
    root = resolve_root(data_root or cfg.data.root)
    images, labels = raw_mnist(root)
    part = build(cfg.partition, "partition")(labels.numpy(), cfg.num_nodes, cfg.seed)[node]
    index = torch.from_numpy(np.asarray(part, dtype=np.int64))
    blob = {"images": images[index].clone(), "labels": labels[index].clone()}
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "data.pt.tmp"
    torch.save(blob, tmp)
    tmp.replace(out / "data.pt")  # atomic: a SuperNode never reads a half-written file
    info = {
        "node": node,
        "num_nodes": int(cfg.num_nodes),
        "seed": int(cfg.seed),
        "overrides": list(overrides),
        "examples": len(part),
        "digits": label_counts(labels[index].numpy()),
    }
    (out / "partition.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", type=int, required=True, help="node index, 0..num_nodes-1")
    parser.add_argument("--out", required=True, help="folder to write data.pt into (the node's data-path)")
    parser.add_argument("--data-root", help="MNIST root holding MNIST/raw/ (default: data.root, $FLMNIST_DATA_DIR)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=seed002")
    args = parser.parse_args(argv)
    try:
        info = export_partition(args.out, args.node, args.overrides, args.data_root)
    except FlmnistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    digits = " ".join(f"{d}:{n}" for d, n in enumerate(info["digits"]))
    print(f"node {info['node']} of {info['num_nodes']}: {info['examples']} examples | {digits}")
    print(f"wrote {Path(args.out).expanduser().resolve() / 'data.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
