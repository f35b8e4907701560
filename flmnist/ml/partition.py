"""How MNIST's training set is split across nodes, selected by the Hydra group ``partition``.

Every partitioner is a deterministic function of (labels, number of partitions,
seed), so each node computes the same split without talking to the others.
``iid``, ``dirichlet`` and ``shards`` wrap Flower Datasets' partitioners (run
offline on an in-memory ``datasets.Dataset`` of the labels); ``digit_groups``
(each node holds every example of its digits, seed 002) is our own.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from flmnist.core.checks import check_integer, check_number, settings_of
from flmnist.core.constants import NUM_CLASSES
from flmnist.core.errors import ConfigError


def _check_count(key: str, value) -> None:
    check_integer(key, value, 1)


class Partition(ABC):
    """Splits example indices into ``num_partitions`` disjoint index arrays."""

    @abstractmethod
    def split(self, labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
        """Indices of each partition (sorted), deterministic in (labels, num_partitions, seed)."""

    def __call__(self, labels: np.ndarray, num_partitions: int, seed: int) -> list[np.ndarray]:
        if num_partitions < 1:
            raise ConfigError(f"num_nodes must be >= 1, got {num_partitions}")
        if num_partitions > len(labels):
            raise ConfigError(
                f"num_nodes={num_partitions} is more partitions than the {len(labels)} "
                "training examples; use at most that many nodes"
            )
        parts = self.split(labels, num_partitions, seed)
        return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _flwr_split(partitioner, labels: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict(
        {"label": labels.astype(np.int64), "idx": np.arange(len(labels), dtype=np.int64)}
    )
    with warnings.catch_warnings():
        # pyarrow 25 deprecates the sort option Flower Datasets' shard partitioner passes; the
        # warning, repeated by every ClientApp process, tells a user nothing they can change
        warnings.filterwarnings("ignore", message="Specifying null_placement", category=FutureWarning)
        first = np.asarray(partitioner.load_partition(0)["idx"])
        # The first load assigns every partition's rows of the partitioner's dataset (Flower
        # Datasets' Dirichlet and shard partitioners keep them in ``_partition_id_to_indices``; the
        # shard partitioner sorts its dataset first); selecting each partition from the dataset
        # again costs about 0.7 ms per node, 37 s at 50,000 nodes. A test holds both ways equal.
        table = getattr(partitioner, "_partition_id_to_indices", None)
        if isinstance(table, dict) and sorted(table) == list(range(num_partitions)):
            idx = np.asarray(partitioner.dataset["idx"], dtype=np.int64)
            return [first] + [idx[np.asarray(table[i], dtype=np.int64)] for i in range(1, num_partitions)]
        return [first] + [np.asarray(partitioner.load_partition(i)["idx"]) for i in range(1, num_partitions)]


class IidPartition(Partition):
    """Shuffle, then cut into equal contiguous parts: the parts of Flower Datasets'
    ``IidPartitioner`` (``Dataset.shard(contiguous=True)``), cut at once rather than one dataset
    selection per node (37 s at 50,000 nodes); a test holds them equal."""

    def split(self, labels, num_partitions, seed):
        order = np.random.default_rng(seed).permutation(len(labels))
        return np.array_split(order, num_partitions)


class DirichletPartition(Partition):
    """Label skew: each digit's examples spread over nodes by Dir(alpha) proportions."""

    def __init__(self, alpha: float = 0.5, min_partition_size: int = 10) -> None:
        check_number("partition.alpha", alpha, 0.0, low_open=True)
        _check_count("partition.min_partition_size", min_partition_size)
        self.alpha = float(alpha)
        self.min_partition_size = min_partition_size

    def split(self, labels, num_partitions, seed):
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=self.alpha,
            min_partition_size=self.min_partition_size,
            self_balancing=True,
            shuffle=True,
            seed=seed,
        )
        try:
            return _flwr_split(partitioner, labels, num_partitions)
        except ValueError as err:
            raise ConfigError(
                f"partition dirichlet: cannot give each of {num_partitions} nodes at least "
                f"partition.min_partition_size={self.min_partition_size} examples with "
                f"partition.alpha={self.alpha} ({err}); raise alpha or lower min_partition_size"
            ) from err


class ShardPartition(Partition):
    """McMahan et al.'s pathological split: sort by digit, cut equal shards, deal
    ``shards_per_client`` shards to each node (Flower Datasets' ``ShardPartitioner``)."""

    def __init__(self, shards_per_client: int = 2) -> None:
        _check_count("partition.shards_per_client", shards_per_client)
        self.shards_per_client = shards_per_client

    def split(self, labels, num_partitions, seed):
        from flwr_datasets.partitioner import ShardPartitioner

        if num_partitions * self.shards_per_client > len(labels):
            raise ConfigError(
                f"partition.shards_per_client={self.shards_per_client} x num_nodes="
                f"{num_partitions} shards is more than the {len(labels)} examples"
            )
        partitioner = ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=self.shards_per_client,
            shuffle=True,
            seed=seed,
        )
        parts = _flwr_split(partitioner, labels, num_partitions)
        if (dealt := sum(len(x) for x in parts)) < len(labels):  # Flower's equal shards leave the rest out
            logging.getLogger("flwr").warning("partition=shard: %d of %d training examples are in no shard (shards of %d examples: "
                "num_nodes x shards_per_client does not divide them)", len(labels) - dealt, len(labels),
                len(labels) // (num_partitions * self.shards_per_client))
        return parts


class DigitGroupPartition(Partition):
    """Node i holds every training example of the digits in ``groups[i]`` (seed 002)."""

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        def is_list(value) -> bool:
            return isinstance(value, Sequence) and not isinstance(value, str)

        if not is_list(groups) or not all(is_list(g) for g in groups):
            raise ConfigError(f"partition.groups must be a list of digit lists, e.g. [[0, 1], [2, 3]], got {groups!r}")
        groups = [list(g) for g in groups]
        seen: set[int] = set()
        for g in groups:
            if not g:
                raise ConfigError("partition.groups: every group needs at least one digit")
            for d in g:
                if isinstance(d, bool) or not isinstance(d, int):
                    raise ConfigError(f"partition.groups: digits are whole numbers 0-9, got {d!r}")
                if not 0 <= d < NUM_CLASSES:
                    raise ConfigError(f"partition.groups: digit {d!r} is outside 0-9")
                if d in seen:
                    raise ConfigError(f"partition.groups: digit {d} is in more than one group")
                seen.add(d)
        self.groups = groups

    def split(self, labels, num_partitions, seed):
        if num_partitions != len(self.groups):
            raise ConfigError(
                f"partition.groups lists {len(self.groups)} groups but num_nodes={num_partitions}; "
                "set num_nodes to the number of groups"
            )
        left = sorted(set(range(NUM_CLASSES)) - {d for g in self.groups for d in g})
        if left:
            logging.getLogger("flwr").warning(
                "partition=digit_groups: digit(s) %s in no group: no node trains on them, and the test set "
                "still scores every digit", ", ".join(map(str, left)))
        return [np.flatnonzero(np.isin(labels, g)) for g in self.groups]


def node_seed(seed: int, node: int, *extra: int) -> int:
    """A seed for one node (and round), derived from the run seed."""
    return int(np.random.SeedSequence([seed, node, *extra]).generate_state(1)[0])


def holdout_split(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split a partition into (train, held-out) indices; the held-out part is ``fraction`` of it."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(indices)
    n_hold = min(round(fraction * len(indices)), max(len(indices) - 1, 0))  # at least one example to train on
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


PARTITIONS = {
    "flmnist.ml.partition.IidPartition": IidPartition,
    "flmnist.ml.partition.DirichletPartition": DirichletPartition,
    "flmnist.ml.partition.ShardPartition": ShardPartition,
    "flmnist.ml.partition.DigitGroupPartition": DigitGroupPartition,
}


def partition_from_spec(spec: dict) -> Partition:
    """Build a partitioner from its config dict (``_target_`` plus parameters).

    Used by clients, which receive the dict in the message and never read Hydra files;
    only the partitioners above can be named.
    """
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target not in PARTITIONS:
        raise ConfigError(
            f"partition._target_ {target!r} is not a known partitioner; valid: {', '.join(PARTITIONS)}"
        )
    cls, takes = PARTITIONS[target], settings_of(PARTITIONS[target])
    if takes is not None and (extra := [k for k in spec if k not in takes]):  # (else a TypeError traceback)
        option = next(name for name, c in OPTIONS.items() if c is cls)
        owners = [name for name, c in OPTIONS.items() if extra[0] in (settings_of(c) or ())]
        raise ConfigError(
            f"partition.{extra[0]} is not a setting of partition={option} (its settings: {', '.join(takes) or 'none'})"
            + (f"; it belongs to partition={' or partition='.join(owners)}: choose that one" if owners else ""))
    return cls(**spec)


OPTIONS = {"iid": IidPartition, "dirichlet": DirichletPartition, "shards": ShardPartition,
           "digit_groups": DigitGroupPartition}  # conf/partition/NAME.yaml


def label_counts(labels: np.ndarray) -> list[int]:
    """Number of examples of each digit."""
    return np.bincount(labels, minlength=NUM_CLASSES).astype(int).tolist()
