"""The head start: a single run's SuperLink and warm executor, started before the command composes
its config (flmnist.launch.head_start), with real Flower processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flmnist.launch import head_start, warm_link
from flmnist.launch.flwr_local import pids_with_flwr_home, run_env, stop_flwr_home

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("args, expected", [
    (["experiment=seed002"], True),
    ([], True),
    (["experiment=seed002", "resume=latest"], True),
    (["-m", "seed=1,2"], False),  # a sweep starts its own (sweep_link)
    (["--cfg", "job"], False),
    (["--help"], False),
    (["simulation=ray"], False),
    (["simulation.backend=inprocess"], False),  # where ClientApps run is set: left to the config
    (["+simulation.ray_address=auto"], False),
    (["simulation.client_gpus=auto"], False),
    (["hydra.mode=MULTIRUN", "seed=1,2"], False),
    (["hydra.run.dir=/tmp/run", "experiment=seed002"], True),
])
def test_which_command_lines_get_a_head_start(args, expected):
    assert head_start.likely(args, {}) is expected or Path("/dev/nvidiactl").exists()
    assert head_start.likely(args, {head_start.SWITCH: "0"}) is False


def _begun(monkeypatch) -> head_start.HeadStart:
    """begin() as the command calls it, before Flower is imported (no GRPC_VERBOSITY yet), then
    Flower's import setting it, as the command's own imports do before the run."""
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    head_start.begin(["experiment=seed002"])
    monkeypatch.setenv("GRPC_VERBOSITY", "error")
    ahead = head_start.claim()
    assert ahead is not None and len(ahead.procs) == 2 and head_start.claim() is None
    return ahead


def _end(ahead: head_start.HeadStart) -> None:
    stop_flwr_home(ahead.home, grace=1.0)
    for proc in ahead.procs:
        proc.wait(timeout=10)
    import shutil

    shutil.rmtree(ahead.home, ignore_errors=True)


def test_a_run_whose_environment_is_the_head_starts_takes_it_over(monkeypatch):
    ahead = _begun(monkeypatch)
    try:
        env = run_env(ahead.home, ports=ahead.ports, backend="inprocess")  # what run_flwr gives Flower
        assert ahead.prepare(env) is True
        assert warm_link.answers(ahead.ports[0])
        assert {p.pid for p in ahead.procs} <= set(pids_with_flwr_home(ahead.home))
        assert all(p.poll() is None for p in ahead.procs)
    finally:
        _end(ahead)


def test_a_run_with_another_environment_stops_the_head_start_and_starts_its_own(monkeypatch):
    ahead = _begun(monkeypatch)
    try:
        env = run_env(ahead.home, ports=ahead.ports, backend="ray")  # the config chose Ray after all
        assert ahead.prepare(env) is False  # (no warm executor for Ray: flwr run starts Flower's own)
        assert all(p.poll() is not None for p in ahead.procs)
        assert pids_with_flwr_home(ahead.home) == []
    finally:
        _end(ahead)


def test_an_unclaimed_head_start_is_stopped_and_its_folder_removed():
    head_start.begin(["experiment=seed002"])
    ahead = head_start._ahead[0]
    head_start.discard()
    assert head_start.claim() is None
    for proc in ahead.procs:
        assert proc.wait(timeout=10) is not None
    assert not Path(ahead.home).exists() and pids_with_flwr_home(ahead.home) == []


def test_a_command_that_fails_on_a_bad_setting_leaves_no_flower_process_or_folder(tmp_path, mnist_root):
    """The command line gets a head start, then its config fails its checks: the error line, exit
    code 2, and nothing of the head start left (its FLWR_HOME, under the private TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "FLMNIST_DATA_DIR": str(mnist_root)}
    done = subprocess.run([str(BIN / "flmnist"), "experiment=seed002", "num_rounds=-1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "flmnist: error:" in done.stderr and "num_rounds" in done.stderr
    assert list(tmp.iterdir()) == []  # (the head start's FLWR_HOME was made here, and removed)
    marker = f"FLWR_HOME={tmp}".encode()
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and any(e.startswith(marker) for e in (proc / "environ").read_bytes().split(b"\0")):
                left.append(proc.name)
        except OSError:
            continue
    assert left == []
