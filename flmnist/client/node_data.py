"""A node's own data: its partition of MNIST (simulation) or its ``data-path`` folder (a device).

Built once per process and cached, so a client call never re-reads or re-splits MNIST.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flmnist.core.errors import ConfigError, DataError
from flmnist.ml.data import load_mnist, normalize, read_data_path
from flmnist.ml.mnist_files import resolve_root
from flmnist.ml.partition import holdout_split, node_seed, partition_from_spec
from flmnist.protocol.messages import simulated_node_name


@dataclass(frozen=True)
class NodeData:
    name: str
    partition: int  # partition index: seeds this node's batches and names it in replies
    train_images: torch.Tensor
    train_labels: torch.Tensor
    holdout_images: torch.Tensor
    holdout_labels: torch.Tensor


@functools.lru_cache(maxsize=4)
def _partition_indices(spec_json: str, root: str, num_partitions: int, seed: int) -> list[np.ndarray]:
    labels = load_mnist(root, True)[1].numpy()
    return partition_from_spec(json.loads(spec_json))(labels, num_partitions, seed)


@functools.lru_cache(maxsize=8)
def _node_data(
    spec_json: str, root: str, num_partitions: int, seed: int, holdout: float,
    partition_id: int | None, data_path: str | None, name: str,
) -> NodeData:
    if data_path:
        # A board's own folder, uint8: its images are normalised once picked (below), so no float
        # copy of the whole folder is made and then indexed (0.07 s instead of 0.10 s for 24,000
        # images, in every message's ClientApp process).
        images, labels = read_data_path(data_path)
        prepare = normalize
        partition_id = device_partition(data_path, num_partitions, seed, partition_id)
        indices = np.arange(len(labels))
    else:
        if partition_id is None or not 0 <= partition_id < num_partitions:
            raise ConfigError(
                f"node config partition-id={partition_id} is outside 0..{num_partitions - 1} "
                f"(num_nodes={num_partitions}); start as many SuperNodes as num_nodes"
            )
        images, labels = load_mnist(root, True)  # decoded and normalised once per process (cached)
        prepare = _as_is
        indices = _partition_indices(spec_json, root, num_partitions, seed)[partition_id]
    train_idx, hold_idx = (torch.from_numpy(i) for i in holdout_split(indices, holdout, node_seed(seed, partition_id)))
    return NodeData(name, partition_id, prepare(images[train_idx]), labels[train_idx],
                    prepare(images[hold_idx]), labels[hold_idx])


def _as_is(images: torch.Tensor) -> torch.Tensor:
    return images


def device_partition(data_path: str, num_partitions: int, seed: int, configured: int | None = None) -> int:
    """The partition a device's data was exported as (``partition.json``), checked against the
    run (its ``num_nodes`` and ``seed`` made the split); a folder of the board's own data, without
    one, takes the node config's ``partition-id``, else 0. It seeds the node's batches and hold-out
    split: a wrong one (an unreadable file read as 0) gave two boards the same."""
    file = Path(data_path) / "partition.json"
    if file.is_file():
        try:
            info = json.loads(file.read_text())
            part = info["node"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{file}: unreadable ({type(err).__name__}: {err}); export the board's data again "
                            "(jetson/device/export_partition.py)") from err
        run = {"num_nodes": num_partitions, "seed": seed}
        exported = {k: info[k] for k in run if k in info and info[k] != run[k]}
        if exported:
            raise ConfigError(f"{file}: exported for {exported}, but the run has num_nodes={num_partitions} "
                              f"seed={seed}; export the board's data with the run's preset")
    else:
        part = 0 if configured is None else configured
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_partitions:
        raise ConfigError(f"{file if file.is_file() else 'node config partition-id'}: partition {part!r} is outside "
                          f"0..{num_partitions - 1} (num_nodes={num_partitions})")
    return part


def node_data(settings, node_config) -> NodeData:
    """This node's data, from the server's :class:`~flmnist.protocol.messages.TrainSettings` and the
    SuperNode's node config."""
    data_path = node_config.get("data-path")
    partition_id = node_config.get("partition-id")
    if data_path:
        name = str(node_config.get("node-name") or data_path)
    else:
        name = simulated_node_name(partition_id)
    root = str(resolve_root(settings.data_root or None))
    return _node_data(
        json.dumps(settings.partition, sort_keys=True),
        root,
        settings.num_partitions,
        settings.seed,
        settings.holdout_fraction,
        None if partition_id is None else int(partition_id),
        str(data_path) if data_path else None,
        name,
    )
