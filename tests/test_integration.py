"""End to end: a real ``flwr run`` (local SuperLink, simulated SuperNodes, ClientApps on Ray) on
real MNIST, and the ``flmnist`` command on the same settings with its ClientApps in Flower's
simulation process (``simulation.backend=inprocess``): the two backends give the same model.
Each run has its own FLWR_HOME and ports, and everything it started is stopped by process id
afterwards."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flmnist.flower_patches.inprocess_backend import INPROCESS_NOTE
from flmnist.launch.flwr_local import BACKEND_ENV, flwr_env, pids_with_flwr_home, stop_flwr_home
from flmnist.ml.data import load_mnist
from flmnist.ml.models import LeNet
from flmnist.ml.training import evaluate

pytestmark = pytest.mark.slow  # real Flower runs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
SMALL = "num_rounds=2 client.local_steps=20 data.holdout_fraction=0.02 eval.update_rounds=[2]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root):
    """The same small training twice: `flwr run .` with overrides (Flower's Ray backend, as a
    user's own `flwr run` has it), and the `flmnist` command with the in-process backend."""
    tmp = tmp_path_factory.mktemp("runs")
    flwr_home = tmp / "flwr-home"
    env = flwr_env(flwr_home)
    env["FLMNIST_DATA_DIR"] = str(mnist_root)
    env.pop(BACKEND_ENV, None)
    cmd = [str(BIN / "flwr"), "run", str(REPO), "--stream",
           "--run-config", f'overrides="{SMALL} run_dir={tmp / "flwr_run"}"']
    try:
        flwr_proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp, check=False)
    finally:
        stopped = stop_flwr_home(flwr_home)
    leftover = pids_with_flwr_home(flwr_home)

    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    cmd = [str(BIN / "flmnist"), *SMALL.split(), "simulation.backend=inprocess", "hydra.run.dir=job"]
    cli_proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp, check=False)
    return {
        "flwr": (tmp / "flwr_run", flwr_proc.stdout + flwr_proc.stderr),
        "flmnist": (tmp / "job", cli_proc.stdout + cli_proc.stderr, cli_proc.returncode),
        "stopped": stopped,
        "leftover": leftover,
    }


@pytest.mark.parametrize("form", ["flwr", "flmnist"])
def test_run_directory_holds_metrics_plots_and_a_working_model(runs, form, mnist_root):
    run_dir, out = runs[form][:2]
    assert (run_dir / "summary.json").is_file(), out[-3000:]
    for name in ("config.yaml", "metrics.json", "metrics.csv", "model.pt", "model_best.pt",
                 "partition_report.csv", "accuracy_loss.png", "client_loss.png", "per_digit_accuracy.png",
                 "summary.md", "confusion/round_0002.csv"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["num_updates"] == 2 and rows[-1]["rejected_updates"] == 0
    assert 0 <= rows[-1]["client_accuracy"] <= 1 and rows[-1]["train_loss"] > 0
    assert set(rows[-1]["update_eval"]) == {"node 0", "node 1"}
    model = LeNet()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    x, y = load_mnist(str(mnist_root), False)
    accuracy = evaluate(model, x, y).accuracy
    assert accuracy > 0.3, f"final model scores {accuracy:.3f}, chance is 0.1"
    assert accuracy == pytest.approx(rows[-1]["test_accuracy"], abs=1e-9)
    assert "[round 2/2] test accuracy" in out
    assert "Federated model: Average loss:" in out
    assert "Model update node 1: Percentage numbers 0-3:" in out
    assert "node   0:" in out  # the partition report


def test_flmnist_command_exits_cleanly(runs):
    assert runs["flmnist"][2] == 0, runs["flmnist"][1][-3000:]


def test_a_normal_runs_log_is_quiet_and_plain(runs):
    """No warnings (Flower's unconditional notes, Ray's tip, PyTorch's deprecations), no dump of
    every metric after flmnist's summary table, no colour codes in the saved log."""
    log = (runs["flmnist"][0] / "flwr_run.log").read_text()
    assert "Summary of evaluated rounds" in log and "Run finished" in log
    noisy = [line for line in log.splitlines() if "WARNING" in line or "Warning" in line or "warnings.warn" in line]
    assert not noisy, noisy
    assert "Final results" not in log and "\x1b[" not in log


def test_flwr_run_form_and_flmnist_command_give_the_same_result(runs):
    """Ray's worker process and the in-process backend: the same numbers, the same model."""
    assert INPROCESS_NOTE in runs["flmnist"][1] and INPROCESS_NOTE not in runs["flwr"][1]
    a, b = (json.loads((runs[f][0] / "metrics.json").read_text()) for f in ("flwr", "flmnist"))
    assert [r["test_accuracy"] for r in a] == [r["test_accuracy"] for r in b]
    assert [r.get("train_loss") for r in a] == [r.get("train_loss") for r in b]
    sa, sb = (torch.load(runs[f][0] / "model.pt", weights_only=True) for f in ("flwr", "flmnist"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_client_evaluation_in_the_train_reply_gives_the_evaluate_exchanges_figures(runs, tmp_path, mnist_root):
    """sampling.client_evaluation=in_train (the deployment's default): the same client metrics per
    round as the evaluate exchange of the run above, and the same model."""
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    cmd = [str(BIN / "flmnist"), *SMALL.split(), "simulation.backend=inprocess", "sampling.client_evaluation=in_train",
           "hydra.run.dir=job"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (runs["flmnist"][0], tmp_path / "job"))
    fields = ["client_loss", "client_accuracy", *(f"client_acc_digit_{d}" for d in range(10)), "test_accuracy"]
    assert [{k: r.get(k) for k in fields} for r in a[1:]] == [{k: r.get(k) for k in fields} for r in b[1:]]
    assert b[0]["client_accuracy"] is not None  # the initial model, from round 1's train replies


def test_everything_flwr_run_started_is_stopped(runs):
    assert runs["stopped"], "found no process under the run's FLWR_HOME: the check would be empty"
    assert runs["leftover"] == []


def test_flmnist_command_rejects_bad_settings_before_starting_flower(tmp_path, mnist_root):
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    flmnist = str(BIN / "flmnist")
    proc = subprocess.run([flmnist, "strategy=fedfoo"], env=env, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert ("Unknown strategy 'fedfoo'. Valid options for strategy: bulyan, fedadagrad, fedadam, fedasync, fedavg, "
            "fedavgm, fedbuff, fedmedian, fedprox, fedtrimmedavg, fedyogi, krum, multikrum") in proc.stderr
    proc = subprocess.run([flmnist, "partition=dirichlet", "partition.alpha=0"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "partition.alpha must be a finite number > 0" in out
    assert "Starting local SuperLink" not in out


def test_the_readmes_sweep_runs_every_job_and_writes_the_comparison_table(tmp_path, mnist_root):
    """The README's sweep line exactly as a user types it (no hydra.* settings): two real runs,
    one comparison table of both, under multirun/DATE/TIME_sweep/ in the working directory."""
    line = next(ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()
                if ln.strip().startswith("flmnist -m strategy=fedavg,fedprox"))
    cmd = [str(BIN / "flmnist"), *line.split("#")[0].split()[1:]]
    assert cmd[1:] == ["-m", "strategy=fedavg,fedprox", "model=logreg", "num_rounds=1"]
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    [sweep] = (tmp_path / "multirun").glob("*/*_sweep")
    jobs = list(csv.DictReader(io.StringIO((sweep / "comparison.csv").read_text())))
    assert len(jobs) == 2, jobs
    assert "strategy=fedavg" in jobs[0]["overrides"] and "strategy=fedprox" in jobs[1]["overrides"]
    for job in jobs:
        assert job["status"] == "finished"
        assert float(job["final_accuracy"]) > 0.5   # chance is 0.1
    for i in range(2):   # each job has its own run directory with its summary
        [summary] = sweep.glob(f"{i}_*/summary.json")
        assert json.loads(summary.read_text())["status"] == "finished"
    assert "comparison.md" in out
    # One SuperLink for both jobs, its simulations forked by the warm executor (sweep_link.warm_up)
    assert "flmnist: job 0: local SuperLink with a warm simulation executor" in out, out[-3000:]
    assert "flmnist: job 1: using the sweep's local SuperLink" in out, out[-3000:]
    assert "Starting local SuperLink" not in out
