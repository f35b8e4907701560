"""End to end: a real ``flwr run`` (local SuperLink, simulated SuperNodes, Ray) on real MNIST,
and the ``flmnist`` command. Each run has its own FLWR_HOME and ports, and everything it
started is stopped by process id afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flmnist.data import load_mnist
from flmnist.flwr_local import flwr_env, pids_with_flwr_home, stop_flwr_home
from flmnist.models import LeNet
from flmnist.training import evaluate

REPO = Path(__file__).resolve().parents[1]
SMALL = "num_rounds=2 client.local_steps=20 data.holdout_fraction=0.02"


def check_run_dir(run_dir: Path, mnist_root: Path, rounds: int) -> dict:
    for name in ("config.yaml", "metrics.json", "metrics.csv", "summary.json", "model.pt", "model_best.pt",
                 "partition_report.csv", "accuracy_loss.png", "client_loss.png", "per_digit_accuracy.png"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    assert (run_dir / "confusion" / f"round_{rounds:04d}.csv").is_file()
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    last = rows[-1]
    assert last["num_updates"] == 2 and last["rejected_updates"] == 0
    assert 0 <= last["client_accuracy"] <= 1 and last["train_loss"] > 0
    model = LeNet()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x, y = load_mnist(str(mnist_root), False)
    accuracy = evaluate(model, x, y).accuracy
    assert accuracy > 0.3, f"final model scores {accuracy:.3f}, chance is 0.1"
    assert accuracy == pytest.approx(last["test_accuracy"], abs=1e-6)
    return json.loads((run_dir / "summary.json").read_text())


def test_flwr_run_trains_and_writes_the_run_directory(tmp_path, mnist_root):
    flwr_home = tmp_path / "flwr-home"
    run_dir = tmp_path / "run"
    env = flwr_env(flwr_home)
    env["FLMNIST_DATA_DIR"] = str(mnist_root)
    overrides = f"{SMALL} run_dir={run_dir}"
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "--stream",
           "--run-config", f'overrides="{overrides}"']
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    finally:
        stop_flwr_home(flwr_home)
    out = proc.stdout + proc.stderr
    assert (run_dir / "summary.json").is_file(), out[-3000:]
    summary = check_run_dir(run_dir, mnist_root, rounds=2)
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert "[round 2/2] test accuracy" in out
    assert "Federated model: Average loss:" in out
    assert "node   0:" in out  # the partition report
    assert pids_with_flwr_home(flwr_home) == []


def test_flmnist_command_runs_a_small_job(tmp_path, mnist_root):
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    cmd = [str(Path(sys.executable).parent / "flmnist"), *SMALL.split(), "strategy=fedprox",
           "eval.update_rounds=[2]", "hydra.run.dir=job"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    summary = check_run_dir(tmp_path / "job", mnist_root, rounds=2)
    assert summary["status"] == "finished"
    assert "Model update node 0: Percentage numbers 0-3:" in out
    assert "Model update node 1: Average loss:" in out
    assert "proximal_mu" in (tmp_path / "job" / "config.yaml").read_text()


def test_flmnist_command_rejects_bad_settings_before_starting_flower(tmp_path, mnist_root):
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    flmnist = str(Path(sys.executable).parent / "flmnist")
    proc = subprocess.run([flmnist, "strategy=fedfoo"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Unknown strategy 'fedfoo'. Valid options for strategy: fedadam, fedavg, fedavgm, fedprox" in proc.stderr
    proc = subprocess.run([flmnist, "partition=dirichlet", "partition.alpha=0"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "partition.alpha must be > 0" in proc.stdout + proc.stderr
    assert "Starting local SuperLink" not in proc.stdout + proc.stderr
