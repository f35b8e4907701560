"""Shared fixtures: the real MNIST copy (FLMNIST_DATA_DIR, else ../shared/data/mnist)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = Path(os.environ.get("FLMNIST_DATA_DIR") or REPO.parent / "shared" / "data" / "mnist").resolve()
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file(), (
        f"The tests need real MNIST: set FLMNIST_DATA_DIR to a folder holding MNIST/raw/ (looked in {root})"
    )
    return root


@pytest.fixture(scope="session")
def train_labels(mnist_root):
    from flmnist.ml.data import load_mnist

    return load_mnist(str(mnist_root), True)[1].numpy()


@pytest.fixture
def task_identity():
    """Outside a Flower process, Message construction needs a task identity; set a fixed one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None
