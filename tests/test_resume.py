"""Checkpoint and resume through real `flwr run`s: a run killed after round k and resumed
ends with the same model and metrics as an uninterrupted run with the same seed; the
exported TorchScript model predicts like the state dict."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from flmnist.data import load_mnist
from flmnist.flwr_local import flwr_env, run_flwr, stop_flwr_home, write_run_config
from flmnist.models import LeNet

REPO = Path(__file__).resolve().parents[1]
# FedAvgM: the server momentum buffer must survive the resume too.
SETTINGS = ["strategy=fedavgm", "strategy.server_momentum=0.5", "num_rounds=4", "client.local_steps=15",
            "data.holdout_fraction=0.02"]


def comparable(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root):
    tmp = tmp_path_factory.mktemp("resume")
    full = tmp / "full"
    run_flwr(REPO, [*SETTINGS, f"run_dir={full}"], 2, tempfile.mkdtemp(prefix="flmnist-test-home-"),
             log_path=tmp / "full.log", timeout=600)

    # Start the same run, kill everything once round 2 is on disk.
    killed = tmp / "killed"
    home = Path(tempfile.mkdtemp(prefix="flmnist-test-home-"))
    env = flwr_env(home)
    cfg = write_run_config(tmp / "killed.toml", [*SETTINGS, f"run_dir={killed}"])
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream", "--run-config", str(cfg),
           "--federation-config", "num-supernodes=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_after = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and killed_after is None:
            time.sleep(0.2)
            try:
                rows = json.loads((killed / "metrics.json").read_text())
            except (OSError, ValueError):
                continue
            if rows[-1]["round"] >= 2 and (killed / "checkpoint.pt").is_file():
                killed_after = rows[-1]["round"]
    finally:
        stop_flwr_home(home)
        proc.kill()
        proc.wait()
    summary_before = (killed / "summary.json").is_file()
    run_flwr(REPO, [f"resume={killed}"], 2, tempfile.mkdtemp(prefix="flmnist-test-home-"),
             log_path=tmp / "resumed.log", timeout=600)
    return {"full": full, "killed": killed, "killed_after": killed_after, "summary_before": summary_before,
            "log": (tmp / "resumed.log").read_text()}


def test_the_run_was_really_killed_midway(runs):
    assert runs["killed_after"] is not None and runs["killed_after"] < 4
    assert not runs["summary_before"], "the killed run must not have finished"
    assert "Resuming" in runs["log"]


def test_resumed_run_equals_the_uninterrupted_run(runs):
    full, resumed = runs["full"], runs["killed"]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "finished"
    assert [r["round"] for r in comparable(resumed)] == [0, 1, 2, 3, 4]  # earlier rows kept, later added
    assert comparable(resumed) == comparable(full)
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchscript_export_predicts_like_the_state_dict(runs, mnist_root):
    run_dir = runs["full"]
    scripted = torch.jit.load(str(run_dir / "model_scripted.pt"))  # no flmnist class needed
    model = LeNet()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    x, _ = load_mnist(str(mnist_root), False)
    with torch.no_grad():
        assert torch.equal(scripted(x[:256]).argmax(1), model(x[:256]).argmax(1))
        torch.testing.assert_close(scripted(x[:256]), model(x[:256]))


def test_resume_errors_name_the_path(tmp_path):
    from flmnist.checkpoint import find_checkpoint
    from flmnist.errors import ConfigError

    with pytest.raises(ConfigError, match=f"no checkpoint at {tmp_path}/checkpoint.pt"):
        find_checkpoint(str(tmp_path), "outputs")
    with pytest.raises(ConfigError, match="resume=latest: no checkpoint.pt under"):
        find_checkpoint("latest", str(tmp_path))
