"""The Jetson deployment, rehearsed on loopback: real SuperLink and SuperNodes with TLS and node
authentication, two refusals, one SuperNode killed mid-run and restarted, a revoked node
(``jetson/rehearsal.py``); and the deployment scripts' dry runs and the partition export.

The rehearsal runs once for the module (about 4 minutes: Flower's deployment loop polls every
3 s, and the SuperLink takes up to 60 s to mark a killed SuperNode offline).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rehearsal = _load("flmnist_rehearsal", JETSON / "rehearsal.py")
export = _load("flmnist_export_partition", JETSON / "device" / "export_partition.py")


@pytest.fixture(scope="module")
def report(tmp_path_factory, mnist_root):
    return rehearsal.rehearse(tmp_path_factory.mktemp("rehearsal"), mnist_root)


@pytest.mark.parametrize("check", list(rehearsal.CHECKS))
def test_rehearsal(report, check):
    rehearsal.CHECKS[check](report)


def test_rehearsal_round_times_are_recorded(report):
    times = rehearsal.round_times(report)
    print(f"deployment round times (s): {times}; run {report.run['seconds']:.0f} s, "
          f"killed node offline after {report.fault['offline_after']:.0f} s")
    assert len(times) == rehearsal.NUM_ROUNDS and all(t > 0 for t in times)


def test_exported_partition_is_the_simulation_partition(tmp_path, mnist_root):
    from flmnist.config import build, compose_config
    from flmnist.data import load_data_path, load_mnist

    info = export.export_partition(tmp_path, 1, ["experiment=seed002"], mnist_root)
    blob = torch.load(tmp_path / "data.pt", weights_only=True)
    assert blob["images"].dtype == torch.uint8 and blob["images"].shape[1:] == (28, 28)
    cfg = compose_config(["experiment=seed002"])
    labels = load_mnist(str(mnist_root), True)[1].numpy()
    part = build(cfg.partition, "partition")(labels, cfg.num_nodes, cfg.seed)[1]
    assert np.array_equal(blob["labels"].numpy(), labels[part])
    assert info["digits"] == np.bincount(labels[part], minlength=10).tolist()
    assert set(np.flatnonzero(info["digits"])) == {4, 5, 6}
    images, _ = load_data_path(tmp_path)  # the ClientApp's reader accepts it
    assert images.shape == (len(part), 1, 28, 28)
    assert json.loads((tmp_path / "partition.json").read_text())["node"] == 1


def test_export_rejects_a_node_outside_the_split(tmp_path, mnist_root, capsys):
    code = export.main(["--node", "3", "--out", str(tmp_path), "--data-root", str(mnist_root), "experiment=seed002"])
    assert code == 2 and "--node 3 is outside 0..2" in capsys.readouterr().err
    assert not (tmp_path / "data.pt").exists()


def _dry(script: str, *args: str) -> str:
    proc = subprocess.run(["bash", str(JETSON / script), "--dry-run", *args], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_script_dry_runs_show_the_commands_they_would_run(tmp_path):
    out = _dry("server/make_certs.sh", str(tmp_path / "c"), "192.168.1.10", "server.lan")
    assert "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:192.168.1.10,DNS:server.lan" in out
    assert not (tmp_path / "c").exists()
    out = _dry("server/start_superlink.sh", "--host", "0.0.0.0", "--port", "9000", "--certs", "/etc/c")
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--database",
                 "--ssl-certfile /etc/c/superlink.crt", "--port 9000"):
        assert flag in out, flag
    assert "flwr supernode register k.pub lab --name jetson-01" in _dry(
        "server/register_node.sh", "--superlink", "lab", "jetson-01", "k.pub")
    assert "flwr supernode unregister 42" in _dry("server/revoke_node.sh", "42")
    assert "ssh-keygen -q -t ecdsa -b 384" in _dry("device/make_node_key.sh", str(tmp_path / "k" / "node.key"))
    assert not (tmp_path / "k").exists()
