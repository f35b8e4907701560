"""Shared fixtures: the real MNIST copy (FLMNIST_DATA_DIR, else ../shared/data/mnist); how the
tests share the machine's two cores (pyproject's addopts run them on 2 pytest-xdist workers)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """pyproject's addopts run the tests on 2 pytest-xdist workers, a test file on one worker
    (``--dist loadfile``: a module's fixtures, such as a real Flower run several tests read, are
    made once), so the deployment rehearsal, which mostly waits on Flower's 3 s polls and its 60 s
    offline detection, runs beside other tests. In a worker, in-process PyTorch work takes one
    thread: the other worker has the other core (Flower runs' own processes keep the default).

    Two Flower runs side by side (one per worker) each keep PyTorch's 2 threads, whose OpenMP
    threads spin between parallel regions: on 2 cores two such runs took 60-72 s together against
    26-30 s passive (docs/running.md, "Several runs at once"). Passive waiting, set here for every
    process the tests start, gives the same figures (the thread count decides them)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# The test files that start Flower, longest first (worker seconds in one CI run, 2026-12-06: the
# rehearsal about 315, the resume runs 220, the CLI's sweeps 200, privacy 225, ...). pytest-xdist
# hands a worker its next file when it is done with one, in collection order (pyproject's
# --no-loadscope-reorder); the longest first, the two workers finish nearly together. In its own
# order the resume file (7 tests) came last and ran alone for its last minute.
LONGEST_FIRST = ("test_deployment.py", "test_resume.py", "test_cli.py", "test_privacy.py", "test_adversarial.py",
                 "test_simulation.py", "test_integration.py", "test_warm_executor.py", "test_async_integration.py",
                 "test_partition.py", "test_config.py", "test_jetson.py", "test_attribution.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order kept


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
