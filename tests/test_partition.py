import warnings

import numpy as np
import pytest

from flmnist.core.errors import ConfigError
from flmnist.ml.partition import (
    DigitGroupPartition,
    DirichletPartition,
    IidPartition,
    ShardPartition,
    holdout_split,
    partition_from_spec,
)

PARTITIONERS = [IidPartition(), DirichletPartition(alpha=0.5), ShardPartition(2), DigitGroupPartition([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])]


@pytest.mark.parametrize("partitioner", PARTITIONERS, ids=lambda p: type(p).__name__)
def test_partitions_are_disjoint_complete_and_deterministic(partitioner, train_labels):
    n = 3 if isinstance(partitioner, DigitGroupPartition) else 10
    parts = partitioner(train_labels, n, seed=7)
    again = partitioner(train_labels, n, seed=7)
    assert len(parts) == n
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "an example is in two partitions"
    assert len(joined) == len(train_labels), "an example is in no partition"
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_seed_changes_the_split(train_labels):
    a = DirichletPartition(0.5)(train_labels, 5, seed=1)
    b = DirichletPartition(0.5)(train_labels, 5, seed=2)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, b))


def test_digit_groups_hold_only_their_digits_seed002_counts(train_labels):
    parts = DigitGroupPartition([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])(train_labels, 3, seed=0)
    assert [len(p) for p in parts] == [24_754, 17_181, 18_065]  # alice, bob, charlie in seed 002
    assert [set(train_labels[p].tolist()) for p in parts] == [{0, 1, 2, 3}, {4, 5, 6}, {7, 8, 9}]


def test_shards_give_each_client_few_digits(train_labels):
    with warnings.catch_warnings(record=True) as caught:  # every ClientApp process splits: no library warnings
        warnings.simplefilter("always")
        parts = ShardPartition(2)(train_labels, 100, seed=0)
    assert [str(w.message) for w in caught] == []
    assert all(len(p) == 600 for p in parts)
    assert max(len(set(train_labels[p])) for p in parts) <= 4  # two sorted shards span at most 4 digits
    assert np.mean([len(set(train_labels[p])) for p in parts]) < 3


def test_dirichlet_small_alpha_skews_labels(train_labels):
    skewed = DirichletPartition(0.1)(train_labels, 10, seed=0)
    even = DirichletPartition(100.0)(train_labels, 10, seed=0)

    def top_share(parts):
        return np.mean([np.bincount(train_labels[p], minlength=10).max() / len(p) for p in parts])

    assert top_share(skewed) > 0.4 > top_share(even)


def test_iid_parts_have_equal_size(train_labels):
    assert {len(p) for p in IidPartition()(train_labels, 6, seed=0)} == {10_000}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DirichletPartition(alpha=0), "partition.alpha must be a finite number > 0"),
        (lambda: DirichletPartition(alpha=-1), "partition.alpha must be a finite number > 0"),
        (lambda: DigitGroupPartition([[0, 1], [1, 2]]), "digit 1 is in more than one group"),
        (lambda: DigitGroupPartition([[0, 10]]), "digit 10 is outside 0-9"),
        (lambda: ShardPartition(0), "partition.shards_per_client must be an integer >= 1"),
    ],
)
def test_invalid_partition_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_more_partitions_than_examples():
    with pytest.raises(ConfigError, match="more partitions than the 5 training examples"):
        IidPartition()(np.arange(5) % 10, 6, seed=0)


def test_group_count_must_equal_nodes(train_labels):
    with pytest.raises(ConfigError, match="set num_nodes to the number of groups"):
        DigitGroupPartition([[0], [1]])(train_labels, 3, seed=0)


def test_holdout_split_is_disjoint_and_sized():
    train, hold = holdout_split(np.arange(100, 200), 0.1, seed=3)
    assert len(hold) == 10 and len(train) == 90
    assert not set(train) & set(hold) and set(train) | set(hold) == set(range(100, 200))
    # a tiny partition keeps one example to train on (2 examples at 0.75 held both out: nothing to train)
    for n, fraction in ((1, 0.6), (2, 0.75)):
        train, hold = holdout_split(np.arange(n), fraction, seed=3)
        assert len(train) == 1 and len(hold) == n - 1


def test_examples_no_shard_takes_are_reported(train_labels, caplog):
    """Flower's ShardPartitioner cuts equal shards and leaves the rest out (7 nodes x 2 shards of
    4,285: 10 examples); the split says so instead of dropping them silently."""
    import logging

    with caplog.at_level(logging.WARNING, logger="flwr"):
        parts = ShardPartition(2)(train_labels, 7, seed=0)
    left = len(train_labels) - sum(len(x) for x in parts)
    assert left == 10 and f"partition=shard: {left} of {len(train_labels)} training examples are in no shard" in caplog.text


def test_clients_can_only_name_known_partitioners():
    with pytest.raises(ConfigError, match="not a known partitioner"):
        partition_from_spec({"_target_": "builtins.eval"})


def _per_node_loads(partitioner, labels: np.ndarray, num_partitions: int) -> list[np.ndarray]:
    """Flower Datasets' own way: one ``load_partition`` per node."""
    from datasets import Dataset

    partitioner.dataset = Dataset.from_dict({"label": labels.astype(np.int64),
                                             "idx": np.arange(len(labels), dtype=np.int64)})
    return [np.asarray(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]


@pytest.mark.parametrize("nodes", [7, 250])
def test_the_fast_splits_equal_flower_datasets_per_node_partitions(train_labels, nodes):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    order = np.random.default_rng(3).permutation(len(train_labels))
    flower = [order[p] for p in _per_node_loads(IidPartitioner(nodes), train_labels[order], nodes)]
    assert all(np.array_equal(a, b) for a, b in zip(IidPartition().split(train_labels, nodes, 3), flower, strict=True))

    def dirichlet():
        return DirichletPartitioner(num_partitions=nodes, partition_by="label", alpha=0.5, min_partition_size=10,
                                    self_balancing=True, shuffle=True, seed=3)

    assert all(np.array_equal(a, b) for a, b in zip(DirichletPartition(0.5).split(train_labels, nodes, 3),
                                                    _per_node_loads(dirichlet(), train_labels, nodes), strict=True))
    shard = ShardPartitioner(num_partitions=nodes, partition_by="label", num_shards_per_partition=2,
                             shuffle=True, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(ShardPartition(2).split(train_labels, nodes, 3),
                                                    _per_node_loads(shard, train_labels, nodes), strict=True))


def test_digits_no_group_holds_are_reported(train_labels, caplog):
    """groups [[0, 1], [2, 3]] keep 24,754 of 60,000 examples: digits 4-9 are trained by nobody and
    still scored; the split says so (it was silent: a review)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="flwr"):
        DigitGroupPartition([[0, 1], [2, 3]])(train_labels, 2, seed=0)
    assert "partition=digit_groups: digit(s) 4, 5, 6, 7, 8, 9 in no group" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        DigitGroupPartition([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])(train_labels, 3, seed=0)
    assert "in no group" not in caplog.text
