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
    """On 2 cores without a GPU (where simulation=auto runs ClientApps in process)."""
    assert head_start.likely(args, {}, cores=2, gpu=False) is expected
    assert head_start.likely(args, {head_start.SWITCH: "0"}, cores=2, gpu=False) is False


@pytest.mark.parametrize("cores, gpu", [(4, False), (16, False), (2, True)])
def test_no_head_start_where_auto_runs_ray_workers_or_takes_the_gpu(cores, gpu):
    assert head_start.likely(["experiment=seed002"], {}, cores=cores, gpu=gpu) is False


@pytest.fixture(autouse=True)
def _no_head_start_left():
    """A failed test's head start is not the next test's (begin() keeps one at a time)."""
    yield
    head_start.discard()


def _begun(monkeypatch) -> head_start.HeadStart:
    """begin() as the command calls it, before Flower is imported (no GRPC_VERBOSITY yet), then
    Flower's import setting it, as the command's own imports do before the run (on any machine:
    likely() is tested above)."""
    monkeypatch.setattr(head_start, "likely", lambda args: True)
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    head_start.begin(["experiment=seed002"])
    monkeypatch.setenv("GRPC_VERBOSITY", "error")
    ahead = head_start.claim()
    assert ahead is not None and len(ahead.procs) == 2
    assert head_start.claim() is ahead  # (the command's to discard until run_flwr calls prepare)
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
        assert head_start.claim() is None  # (now run_flwr's to stop)
        assert warm_link.answers(ahead.ports[0])
        assert {p.pid for p in ahead.procs} <= set(pids_with_flwr_home(ahead.home))
        assert all(p.poll() is None for p in ahead.procs)
    finally:
        _end(ahead)


def test_a_run_with_another_environment_stops_the_head_start_and_starts_its_own(monkeypatch, capsys):
    ahead = _begun(monkeypatch)
    try:
        env = run_env(ahead.home, ports=ahead.ports, backend="ray")  # the config chose Ray after all
        assert ahead.prepare(env) is False  # (no warm executor for Ray: flwr run starts Flower's own)
        assert all(p.poll() is not None for p in ahead.procs)
        assert pids_with_flwr_home(ahead.home) == []
        assert f"{head_start.NOT_TAKEN} (differing: FLMNIST_SIMULATION_BACKEND)" in capsys.readouterr().out
    finally:
        _end(ahead)


def test_a_run_moved_elsewhere_by_hydra_does_not_take_the_head_start_over(monkeypatch, tmp_path, capsys):
    """hydra.job.chdir=true: the run's processes would start in its directory, the head start's
    did not; the environment alone cannot tell."""
    ahead = _begun(monkeypatch)
    try:
        monkeypatch.chdir(tmp_path)
        env = run_env(ahead.home, ports=ahead.ports, backend="inprocess")
        assert ahead.prepare(env) is True  # (a SuperLink and warm executor of its own, started here)
        assert f"{head_start.NOT_TAKEN} (differing: the working directory)" in capsys.readouterr().out
        assert all(p.poll() is not None for p in ahead.procs)  # the head start's, stopped
    finally:
        _end(ahead)


def test_a_head_start_no_run_took_over_is_stopped_and_its_folder_removed(monkeypatch):
    """Claimed by the run, which then failed before run_flwr called prepare (a full disk while
    staging the app, a Ctrl-C): the command's exit stops it."""
    monkeypatch.setattr(head_start, "likely", lambda args: True)
    head_start.begin(["experiment=seed002"])
    ahead = head_start.claim()
    assert ahead is not None
    head_start.discard()
    assert head_start.claim() is None
    for proc in ahead.procs:
        assert proc.wait(timeout=10) is not None
    assert not Path(ahead.home).exists() and pids_with_flwr_home(ahead.home) == []


# The flmnist command (flmnist.launch.command.main) with its head start on whatever machine, and
# saying where the head start's FLWR_HOME is
COMMAND = """import sys
from flmnist.launch import command, head_start
head_start.likely = lambda args: True
began = head_start.begin
def begin(args):
    began(args)
    print("HEAD START", head_start._ahead[0].home if head_start._ahead else None, flush=True)
head_start.begin = begin
sys.argv = ["flmnist", *sys.argv[1:]]
command.main()
"""


def test_a_command_that_fails_on_a_bad_setting_leaves_no_flower_process_or_folder(tmp_path, mnist_root):
    """The command gets a head start, then its config fails its checks: the error line, exit code
    2, and nothing of the head start left (its FLWR_HOME, under the private TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "FLMNIST_DATA_DIR": str(mnist_root)}
    done = subprocess.run([sys.executable, "-c", COMMAND, "experiment=seed002", "num_rounds=-1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "flmnist: error:" in done.stderr and "num_rounds" in done.stderr
    assert f"HEAD START {tmp}/flmnist-flwr-home-" in done.stdout  # (it began, there)
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


@pytest.mark.slow
def test_a_real_run_takes_its_head_start_over(tmp_path, mnist_root):
    """The flmnist command with its head start (on any machine: COMMAND forces it) and a small
    run in process: the run takes the SuperLink and warm executor over (it would say otherwise)
    and finishes, and nothing of either outlives it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "FLMNIST_DATA_DIR": str(mnist_root)}
    done = subprocess.run([sys.executable, "-c", COMMAND, "model=logreg", "num_nodes=2", "num_rounds=1",
                           "client.local_steps=5", "simulation.backend=inprocess", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"HEAD START {tmp}/flmnist-flwr-home-" in done.stdout, out[-3000:]
    assert head_start.NOT_TAKEN not in out and "did not start" not in out, out[-3000:]
    assert "Starting local SuperLink" not in out  # (flwr run found the head start's answering)
    assert (tmp_path / "run" / "summary.json").is_file()
    assert [p.name for p in tmp.iterdir() if p.name.startswith("flmnist-flwr-home-")] == []
