"""The CPU SuperNode for arm64 boards (JetPack 4/5): its pinned requirement files resolve to aarch64
wheels (binary only) for the boards' Pythons (``jetson/check_aarch64.py``; needs the package index,
about a minute), the ClientApp trains with nothing but the device set, the benchmark command, and
the install script's and emulated rehearsal's command lines.

The emulated arm64 SuperNode itself (an arm64 root under qemu in a real TLS + node-auth deployment,
one seed-002 round) is its own command, not part of this suite: ``python jetson/emulated_arm64.py``
(root, qemu, mmdebstrap; see jetson/README.md, section 10). Here only its command lines are checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from scripts import load_script

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"


check_aarch64 = load_script("flmnist_check_aarch64", JETSON / "check_aarch64.py")
RESOLVED: dict[str, list[dict]] = {}


@pytest.mark.parametrize("target", check_aarch64.TARGETS, ids=lambda t: f"{t.requirements}-py{t.python}")
def test_device_requirements_resolve_on_aarch64(target):
    """pip finds an aarch64 (or pure-Python) wheel for every pin, and the file holds every dependency."""
    items = check_aarch64.resolve(target)
    RESOLVED[target.requirements] = items
    wheels = check_aarch64.wheel_names(items)
    assert all(w.endswith("-none-any.whl") or "aarch64" in w for w in wheels), wheels
    assert check_aarch64.missing_dependencies(target, items) == []
    pins = check_aarch64.pinned(JETSON / target.requirements)
    assert len(wheels) == len(pins), (len(wheels), len(pins))
    if "torch" in pins:
        (torch,) = [w for w in wheels if w.startswith("torch-")]
        tag = "manylinux2014_aarch64" if target.glibc < 28 else "manylinux_2_28_aarch64"
        assert torch.endswith(f"{tag}.whl"), torch


def test_closure_check_names_a_missing_or_wrong_pin():
    target = check_aarch64.TARGETS[0]
    items = RESOLVED.get(target.requirements) or check_aarch64.resolve(target)
    pins = check_aarch64.pinned(JETSON / target.requirements)
    without_idna = {k: v for k, v in pins.items() if k != "idna"}
    problems = check_aarch64.missing_dependencies(target, items, without_idna)
    assert any("needs 'idna" in p and "not pinned" in p for p in problems), problems
    old_numpy = {**pins, "numpy": "1.0"}
    problems = check_aarch64.missing_dependencies(target, items, old_numpy)
    assert any(p.startswith("flwr needs 'numpy") and "pinned numpy==1.0" in p for p in problems), problems


def test_device_files_pin_the_servers_flower():
    server = re.search(r'"flwr\[simulation\]==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for name in ("requirements-cpu.txt", "requirements-cpu-jp4.txt", "requirements-supernode.txt"):
        pins = check_aarch64.pinned(JETSON / name)
        assert pins["flwr"] == server, (name, pins["flwr"])
        # none of the server's heavier set
        assert not {"hydra-core", "omegaconf", "matplotlib", "onnx", "ray", "torchvision", "flwr-datasets"} & set(pins)
    assert check_aarch64.pinned(JETSON / "requirements-cpu.txt")["torch"] == "2.9.1"
    assert check_aarch64.pinned(JETSON / "requirements-cpu-jp4.txt")["torch"] == "2.5.1"


CLIENT_ONLY = r"""
import sys
SERVER_ONLY = {"hydra", "omegaconf", "matplotlib", "torchvision", "onnx", "ray", "flwr_datasets", "datasets"}
for name in SERVER_ONLY:  # as if not installed: importing them fails, importlib.util.find_spec finds nothing
    sys.modules[name] = None
import json, torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flmnist.protocol import messages as p
from flmnist.client_app import train_handler
from flmnist.ml.models import LeNet

from flwr.supercore.task_identity import TaskIdentity  # what a real ClientApp process has set

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
data_path = sys.argv[1]
settings = p.TrainSettings(model={"_target_": "flmnist.ml.models.LeNet"}, partition={}, num_partitions=3, seed=2,
                           holdout_fraction=0.1, local_steps=3, batch_size=8, lr=0.1)
content = RecordDict({p.ARRAYS: ArrayRecord(LeNet().state_dict()), p.CONFIG: settings.to_record(**{p.SERVER_ROUND: 1})})
msg = Message(content=content, dst_node_id=1, message_type="train")
ctx = Context(run_id=1, node_id=1, node_config={"data-path": data_path, "node-name": "board"}, state=RecordDict(),
              run_config={})
reply = train_handler(msg, ctx)
info = dict(reply.content.config_records[p.NODE_INFO])
metrics = dict(reply.content.metric_records[p.METRICS])
print(json.dumps({"info": info, "examples": metrics[p.EXAMPLES_PROCESSED],
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in SERVER_ONLY and sys.modules[m])}))
"""


def test_client_app_trains_with_the_device_set_only(tmp_path):
    """A SuperNode imports only flwr, numpy and torch: the ClientApp's modules must not need the
    server's packages (Hydra, omegaconf, matplotlib, torchvision, ONNX, Ray, Flower Datasets)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    torch.save({"images": torch.randint(0, 256, (60, 28, 28), dtype=torch.uint8, generator=gen),
                "labels": torch.randint(0, 10, (60,), generator=gen)}, tmp_path / "data.pt")
    (tmp_path / "partition.json").write_text(json.dumps({"node": 2}))
    proc = subprocess.run([sys.executable, "-c", CLIENT_ONLY, str(tmp_path)], capture_output=True, text=True,
                          check=False, timeout=300, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["info"]["node-name"] == "board" and seen["info"]["device"] == "cpu", seen
    assert seen["info"]["machine"] and seen["examples"] == 3 * 8 and seen["modules"] == [], seen


def test_benchmark_prints_samples_per_second_and_fleet_lines():
    script = JETSON / "device" / "benchmark.py"
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.3", "--threads", "1"], capture_output=True,
                          text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "1 threads:" in out and "samples/s" in out and "set OMP_NUM_THREADS=1" in out, out
    assert re.search(r"base_throughput: \d+\.\d", out) and "speed:" in out, out
    proc = subprocess.run([sys.executable, str(script), "--seconds", "0.3", "--threads", "1", "--json"],
                          capture_output=True, text=True, check=False, timeout=300)
    info = json.loads(proc.stdout)
    assert info["best_threads"] == 1 and info["samples_per_s"] > 0 and info["device"] == "cpu", info
    bad = subprocess.run([sys.executable, str(script), "--threads", "two"], capture_output=True, text=True,
                         check=False, timeout=120)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_install_venv_dry_run_installs_exactly_the_pins():
    proc = subprocess.run(["sh", str(JETSON / "device" / "install_venv.sh"), "--dry-run", "/opt/flmnist/venv", "--",
                           "--no-index", "--find-links", "/wheels"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "python3.11 -m venv /opt/flmnist/venv" in proc.stdout
    assert "--no-deps --only-binary=:all: -r" in proc.stdout and "requirements-cpu.txt --no-index --find-links /wheels" \
        in proc.stdout, proc.stdout


def test_emulated_rehearsal_runs_in_a_chroot_of_its_own():
    """The arm64 node's command line: its own mount namespace, /proc, /dev and the work folder
    bound at the same path, the venv's flower-supernode, read-only binds remounted read-only."""
    emulated = load_script("flmnist_emulated_arm64", JETSON / "emulated_arm64.py")
    argv, made = emulated.chroot_argv(Path("/nonexistent-root"), ["/opt/flmnist/venv/bin/flower-supernode", "--x"],
                                      [], cwd="/w", env={"OMP_NUM_THREADS": "2"})
    assert made == [] and argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[7]
    assert "mount -t proc proc /nonexistent-root/proc" in script and "mount --rbind /dev /nonexistent-root/dev" in script
    assert "exec chroot /nonexistent-root /usr/bin/env --chdir=/w OMP_NUM_THREADS=2" in script
    assert argv[-2:] == ["/opt/flmnist/venv/bin/flower-supernode", "--x"]
    overrides = emulated.run_overrides(Path("/r"), Path("/m"))
    assert "num_rounds=1" in overrides and "sampling.min_available_nodes=3" in overrides
