import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flmnist.core.errors import DataError
from flmnist.ml.data import load_mnist, normalize, read_data_path
from flmnist.ml.mnist_files import MNIST_FILES, ensure_mnist, resolve_root


def test_root_prefers_setting_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLMNIST_DATA_DIR", str(tmp_path / "env"))
    assert resolve_root(tmp_path / "cfg") == (tmp_path / "cfg").resolve()
    assert resolve_root(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("FLMNIST_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_root(None) == (tmp_path / "cache" / "flmnist" / "mnist").resolve()


def test_missing_files_error_names_folder_and_the_four_files(tmp_path):
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg
    for name in MNIST_FILES:
        assert name in msg


@pytest.fixture
def mnist_copy(mnist_root, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(mnist_root / "MNIST" / "raw" / name, raw / name)
    return tmp_path


def test_wrong_magic_number_names_the_file(mnist_copy):
    bad = mnist_copy / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(bad.read_bytes())
    data[3] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic number"):
        ensure_mnist(mnist_copy)


def test_truncated_file_names_the_file(mnist_copy):
    bad = mnist_copy / "MNIST" / "raw" / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*bytes, expected"):
        ensure_mnist(mnist_copy)


def test_mnist_is_decoded_once_per_process(mnist_root):
    first = load_mnist(str(mnist_root), True)
    second = load_mnist(str(mnist_root), True)
    assert first[0] is second[0]
    assert first[0].shape == (60_000, 1, 28, 28) and first[1].shape == (60_000,)
    assert np.bincount(first[1].numpy()).tolist()[:2] == [5923, 6742]


@pytest.mark.parametrize("train", [True, False])
def test_mnist_decodes_exactly_as_torchvision_does(mnist_root, train):
    from torchvision.datasets import MNIST

    from flmnist.ml.data import normalize

    images, labels = load_mnist(str(mnist_root), train)
    reference = MNIST(str(mnist_root), train=train, download=False)
    assert torch.equal(images, normalize(reference.data))
    assert torch.equal(labels, reference.targets.long())


def test_data_path_reads_a_device_folder(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.tensor([0, 1, 2, 3, 4])}, tmp_path / "data.pt")
    raw, y = read_data_path(tmp_path)
    x = normalize(raw)
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]


def test_a_devices_node_data_is_its_folder_normalised_then_split(tmp_path):
    """The ClientApp picks a board's train and hold-out images as uint8 and normalises them after:
    the same tensors, bit for bit, as normalising the whole folder and picking from it."""
    from flmnist.client.node_data import _node_data, node_seed
    from flmnist.ml.partition import holdout_split

    images = torch.randint(0, 256, (200, 28, 28), dtype=torch.uint8)
    labels = torch.arange(200) % 10
    torch.save({"images": images, "labels": labels}, tmp_path / "data.pt")
    data = _node_data("{}", "", 1, 7, 0.1, None, str(tmp_path), "board")
    raw, y = read_data_path(tmp_path)
    x = normalize(raw)  # the whole folder normalised, then picked from
    train, hold = (torch.from_numpy(i) for i in holdout_split(np.arange(200), 0.1, node_seed(7, 0)))
    assert torch.equal(data.train_images, x[train]) and torch.equal(data.holdout_images, x[hold])
    assert torch.equal(data.train_labels, y[train]) and torch.equal(data.holdout_labels, y[hold])
    assert len(data.holdout_labels) == 20 and data.train_images.dtype == torch.float32


def test_data_path_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nowhere'}.*data.pt"):
        read_data_path(tmp_path / "nowhere")
    torch.save({"images": torch.zeros(3, 5, 5), "labels": torch.zeros(3)}, tmp_path / "data.pt")
    with pytest.raises(DataError, match="expected images uint8"):
        read_data_path(tmp_path)


def test_offline_download_fails_with_one_error_that_says_how_to_place_the_files(tmp_path):
    """data.download=auto (the default) tries torchvision's mirrors; offline (here: every
    connection refused through a dead proxy) the command ends with one line naming the folder,
    the four files and how to place them, exit 2, and no run directory."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "http_proxy": dead, "https_proxy": dead, "HTTP_PROXY": dead, "HTTPS_PROXY": dead}
    env.pop("FLMNIST_DATA_DIR", None)
    root = tmp_path / "empty"
    out = subprocess.run([str(Path(sys.executable).parent / "flmnist"), f"data.root={root}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("flmnist: error: ")]
    assert len(error) == 1, out.stderr[-2000:]
    assert f"MNIST is missing from {root / 'MNIST' / 'raw'} and the download failed" in error[0]
    assert all(name in error[0] for name in MNIST_FILES) and "FLMNIST_DATA_DIR" in error[0]
    assert "downloading it with torchvision" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/ directory, no empty MNIST/raw left


def test_a_root_pointing_at_the_files_themselves_says_which_folder_to_name(tmp_path, mnist_root):
    raw = tmp_path / "copy" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    with pytest.raises(DataError, match=rf"it holds the files themselves, but flmnist looks in ROOT/MNIST/raw/; "
                                        rf"set data.root or FLMNIST_DATA_DIR to {tmp_path / 'copy'}$"):
        ensure_mnist(raw, download=False)
    assert ensure_mnist(tmp_path / "copy", download=False) == raw


def test_normalize_gives_the_formulas_values_bit_for_bit_and_leaves_its_input_alone():
    import torch

    from flmnist.ml.data import MEAN, STD, normalize

    images = torch.arange(256, dtype=torch.uint8).repeat(4)[:28 * 28 * 1].reshape(1, 28, 28)
    expected = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
    assert torch.equal(normalize(images), expected)
    floats = images.float()
    normalize(floats)
    assert torch.equal(floats, images.float())


def test_a_device_folder_s_partition_is_checked_against_the_run(tmp_path):
    """partition.json decides a board's seeds and hold-out split: an unreadable one was read as
    partition 0 (two boards the same), one out of range or exported for another split was taken
    as it was (a review)."""
    from flmnist.client.node_data import device_partition
    from flmnist.core.errors import ConfigError

    info = tmp_path / "partition.json"
    assert device_partition(str(tmp_path), 3, 0) == 0 and device_partition(str(tmp_path), 3, 0, configured=2) == 2
    info.write_text(json.dumps({"node": 1, "num_nodes": 3, "seed": 0}))
    assert device_partition(str(tmp_path), 3, 0) == 1
    with pytest.raises(ConfigError, match=r"exported for \{'num_nodes': 3\}, but the run has num_nodes=4 seed=0"):
        device_partition(str(tmp_path), 4, 0)
    for bad, message in (({"node": 7}, "partition 7 is outside 0..2"), ({"node": -4}, "partition -4 is outside"),
                         ({"node": "1"}, "partition '1' is outside")):
        info.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            device_partition(str(tmp_path), 3, 0)
    info.write_text("{not json")
    with pytest.raises(DataError, match="partition.json: unreadable"):
        device_partition(str(tmp_path), 3, 0)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([float("nan")] * 4), "labels must be integers"),
    (torch.tensor([8.7] * 4), "labels must be integers"),
    (torch.tensor([True] * 4), "labels must be integers"),
    ([1, 2, 3, 4], "images and labels must be tensors"),
])
def test_a_data_pt_with_labels_of_the_wrong_kind_is_refused(tmp_path, labels, message):
    """NaN labels passed the range check and became -2**63 (training failed later), 8.7 became 8,
    a list raised AttributeError outside the checks (a review)."""
    torch.save({"images": torch.zeros(4, 28, 28, dtype=torch.uint8), "labels": labels}, tmp_path / "data.pt")
    with pytest.raises(DataError, match=message):
        read_data_path(tmp_path)


def test_the_server_knows_each_nodes_held_out_digits_as_the_node_splits_them(tmp_path, mnist_root):
    """The screen refuses an evaluation whose per-digit totals are not its node's held-out digits;
    those the server computes (run_setup.partitions) must be the ones the ClientApp evaluates on."""
    from flmnist.client.node_data import node_data
    from flmnist.config.compose import compose_config
    from flmnist.ml.partition import label_counts
    from flmnist.protocol.messages import TrainSettings
    from flmnist.runtime.run_setup import partitions

    cfg = compose_config(["partition=dirichlet", "num_nodes=3", "seed=7", f"data.root={mnist_root}"])
    limits = partitions(cfg, mnist_root, tmp_path)
    sent = TrainSettings.from_config(cfg)
    for i in range(3):
        held = node_data(sent, {"partition-id": i}).holdout_labels.numpy()
        assert limits.holdout_per_digit(i) == label_counts(held) and sum(label_counts(held)) == limits.holdout_examples[i]
