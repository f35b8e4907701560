"""A sweep's jobs in two lanes (flmnist/launch/lanes.py): how many lanes, what a lane prints, the
table gathered in job order, and real sweeps: every job's results the same as its command run
alone, a failing job isolated, a signal stopping both lanes and everything they started."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from flmnist.config.compose import compose_config, sweep_jobs
from flmnist.core.errors import ConfigError
from flmnist.launch import lane_process, lanes, sweep_state
from flmnist.launch.outcome import Stop
from tests.test_cli import FLMNIST, signalled, wait_until_gone

LANES_LINE = "flmnist: 4 jobs in 2 lanes, 2 at a time, each lane with its own local SuperLink"


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5, None])
def test_a_bad_lane_count_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match=r"hydra.launcher.lanes must be auto or an integer >= 1, got "):
        lanes.check_lanes(value)


def test_lanes_auto_means_two_for_four_in_process_jobs_and_one_otherwise():
    # (simulation=inprocess: what auto resolves to on 2 cores and no GPU, wherever the test runs)
    configs = [compose_config(job) for job in sweep_jobs(["model=logreg", "simulation=inprocess", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, configs, cores=2) == 2
    assert lanes.lane_count("auto", 3, configs[:3], cores=2) == 1  # each lane would start a SuperLink for 1-2 jobs
    assert lanes.lane_count("auto", 4, configs, cores=1) == 1
    ray = [compose_config(job) for job in sweep_jobs(["simulation=ray", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, ray, cores=2) == 1  # Ray's workers take the cores themselves
    mlflow = [compose_config(job) for job in sweep_jobs(["logger=mlflow", "simulation=inprocess", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, mlflow, cores=2) == 1  # one SQLite store for the sweep's runs
    assert lanes.lane_count(2, 4, mlflow, cores=2) == 1  # ... even when asked for lanes (said on stdout)


def test_the_command_decides_the_lanes_where_the_jobs_configs_are_at_hand():
    """hydra_arguments composes every job's config anyway: the lane count is decided there and
    handed to Hydra as a number (the launcher composed each job's config a second time); a
    lane count with another launcher is refused, naming the setting."""
    configs = [compose_config(job) for job in sweep_jobs(["model=logreg", "simulation=inprocess", "seed=1,2,3,4"])]
    args = ["-m", "model=logreg", "simulation=inprocess", "seed=1,2,3,4"]
    assert lanes.with_launcher(args, [], False, configs)[-2:] == ["hydra/launcher=flmnist_lanes",
                                                                   "hydra.launcher.lanes=2"]
    given = "hydra.launcher.lanes=1"
    assert lanes.with_launcher([*args, given], [given], False, configs) == [*args, "hydra/launcher=flmnist_lanes",
                                                                           "hydra.launcher.lanes=1"]
    assert lanes.with_launcher(args, [], True, configs) == args  # a user's own hydra/launcher=...
    with pytest.raises(ConfigError, match="hydra.launcher.lanes=1: a setting of flmnist's sweep launcher"):
        lanes.with_launcher([*args, given], [given], True, configs)
    assert lanes.lane_count("3", 4, configs, cores=2) == 3 and lanes.lane_count(8, 4, configs) == 4
    assert lanes.lane_count(1, 4, configs) == 1


def test_a_lanes_lines_start_with_its_jobs_number_even_when_written_in_pieces():
    out, prefix = io.StringIO(), lane_process.Prefix()
    stream = lane_process.Prefixed(out, prefix)
    prefix.text = "[job 2] "
    stream.write("flmnist: a")
    stream.write("nd more\nnext line\nhalf")
    prefix.text = "[job 3] "
    stream.write(" line\n\nlast\n")
    stream.write("10%\r20%\n")  # (a progress line's \r is no line end)
    assert out.getvalue() == ("[job 2] flmnist: and more\n[job 2] next line\n[job 2] half line\n[job 3] \n"
                              "[job 3] last\n[job 3] 10%\r20%\n")


def test_the_table_lists_jobs_in_their_order_whatever_order_they_end_in(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_state, "table", {})
    for job in (1, 3, 0):
        sweep_state.record(tmp_path, job, {"overrides": f"seed={job}", "status": "finished", "final_accuracy": job / 10})
    rows = list(csv.DictReader(io.StringIO((tmp_path / "comparison.csv").read_text())))
    assert [(r["job"], r["overrides"]) for r in rows] == [("0", "seed=0"), ("1", "seed=1"), ("3", "seed=3")]
    monkeypatch.setattr(sweep_state, "in_lane", True)  # a lane sends its outcome: the command writes the table
    (tmp_path / "comparison.csv").unlink()
    assert sweep_state.record(tmp_path, 2, {"status": "finished"}) is None
    assert not (tmp_path / "comparison.csv").exists()


def test_a_bad_lane_count_on_the_command_line_ends_before_anything_starts(tmp_path, mnist_root):
    proc = subprocess.run([FLMNIST, "-m", "seed=1,2", "hydra.launcher.lanes=0"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "flmnist: error: hydra.launcher.lanes must be auto or an integer >= 1, got 0"
    assert not (tmp_path / "multirun").exists()


def final_accuracy(run_dir) -> float:
    return json.loads((run_dir / "summary.json").read_text())["final_accuracy"]


@pytest.mark.slow
def test_a_four_job_sweep_runs_in_two_lanes_with_each_jobs_results_as_alone(tmp_path, mnist_root):
    """As a user types it: 4 jobs, two of them failing (every update non-finite). Two lanes, each
    with its own SuperLink; the failed jobs are named and the others finish; each finished job's
    accuracy is that of the same command run alone; nothing the sweep started outlives it."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    shared = ["model=logreg", "num_nodes=2", "client.local_steps=5", "num_rounds=1", "max_failed_rounds=1",
              "client.fault_nodes=[0,1]"]  # (2 lanes: on 2 cores and no GPU, as CI, simulation=auto is in process)
    proc = subprocess.run([FLMNIST, "-m", *shared, "client.fault=nan,null", "seed=1,2"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert LANES_LINE in out, out[-4000:]
    assert len(re.findall(r"local SuperLink with a warm simulation executor", out)) == 2, out[-4000:]
    assert proc.stderr.strip().endswith("flmnist: error: 2 sweep job(s) did not finish: 0, 1"), proc.stderr[-3000:]
    job_lines = [ln for ln in proc.stdout.splitlines() if "Successfully started run" in ln or "| 1 | 2 |" in ln]
    assert job_lines and all(re.match(r"\[job [0-3]\] ", ln) for ln in job_lines), job_lines
    [sweep] = (tmp_path / "multirun").glob("*/*")
    table = list(csv.DictReader(io.StringIO((sweep / "comparison.csv").read_text())))
    assert [(r["job"], r["status"]) for r in table] == [("0", "failed"), ("1", "failed"), ("2", "finished"),
                                                        ("3", "finished")], table
    assert ["client.fault=nan" in r["overrides"] for r in table] == [True, True, False, False]
    alone = tmp_path / "alone"
    single = subprocess.run([FLMNIST, *shared, "client.fault=null", "seed=2", f"hydra.run.dir={alone}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, check=False, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    assert final_accuracy(next(sweep.glob("3_*"))) == final_accuracy(alone)
    assert not (left := wait_until_gone(marker)), f"processes the sweep started outlived it: {left}"


@pytest.mark.slow
def test_sigterm_stops_both_lanes_and_everything_they_started(tmp_path, mnist_root):
    """SIGTERM to the command while both lanes train: each lane stops its job, whose results so far
    are summarized and named; the command exits 143; nothing it started runs on."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([FLMNIST, "-m", "model=logreg", "num_nodes=2", "client.local_steps=5", "num_rounds=60",
                                 "seed=1,2,3,4"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob("multirun/*/*/[01]_*/metrics.json"))) < 2:  # both lanes train
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "the lanes did not both train within 300 s"
            time.sleep(0.2)
        code, tracked = signalled(proc, marker, signal.SIGTERM, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = stderr.read_text()
    assert code == 143, text[-3000:]
    assert len(re.findall(r"stopped by SIGTERM; .*results after round \d+ in .*/[01]_[^/]*/summary.json", text)) == 2, text
    for job in tmp_path.glob("multirun/*/*/[01]_*"):
        assert json.loads((job / "summary.json").read_text())["status"] == "stopped"
    assert not list(tmp_path.glob("multirun/*/*/[23]_*"))  # never started
    assert not (left := wait_until_gone(marker, tracked)), f"processes the command started outlived it: {left}"


def test_a_job_that_crashed_in_a_lane_fails_the_sweep_as_it_would_in_one(tmp_path, monkeypatch):
    """A bug's exception in a job (not a flmnist error, which is a failed summary) was reported as
    a job that completed: the table said failed, the command exited 0 (a review). Hydra's sweeper
    reads each return's value after the batch: a crashed job's raises, as with one lane."""
    monkeypatch.setattr(sweep_state, "table", {})
    runs = lanes.Lanes(None, {0: ["seed=1"], 1: ["seed=2"]}, 2, tmp_path)
    lane = lanes._Lane(pid=0, fd=-1)
    runs._take(lane, ("start", 0))
    runs._take(lane, ("job", 0, {"overrides": "seed=1", "status": "failed"}, [], [], "Traceback ...\nKeyError: 'x'"))
    runs._take(lane, ("job", 1, {"overrides": "seed=2", "status": "finished"}, [], [], None))
    with pytest.raises(RuntimeError, match="job 0 failed:\nTraceback ...\nKeyError: 'x'"):
        _ = runs.returns[0].return_value
    assert runs.returns[1].return_value == {"overrides": "seed=2", "status": "finished"}
    assert [r["job"] for r in csv.DictReader(io.StringIO((tmp_path / "comparison.csv").read_text()))] == ["0", "1"]


def test_a_job_whose_lane_was_killed_fails_and_so_do_jobs_no_lane_took(tmp_path, monkeypatch, capsys):
    """A lane killed under its job (kill -9, out of memory) ended the sweep in a traceback (a
    review): that job, and any job no lane took because every lane had ended, is a failed job,
    said and listed, and the command exits 1 naming them (cli.main)."""
    monkeypatch.setattr(sweep_state, "table", {})
    monkeypatch.setattr(sweep_state, "failed_jobs", [])
    runs = lanes.Lanes(None, {0: ["seed=1"], 1: ["seed=2"], 2: ["seed=3"]}, 2, tmp_path)
    killed, done = lanes._Lane(pid=123, fd=-1, job=1, status=signal.SIGKILL), lanes._Lane(pid=124, fd=-1, status=0)
    runs.lanes = [killed, done]
    runs._take(done, ("job", 0, {"overrides": "seed=1", "status": "finished"}, [], [], None))
    returns = runs._outcome()
    assert [r.return_value["status"] for r in returns] == ["finished", "failed", "failed"]
    assert sweep_state.failed_jobs == ["1", "2"]
    err = capsys.readouterr().err
    assert "flmnist: error: job 1: its lane (pid 123) killed by signal 9 before the job ended" in err
    assert "flmnist: error: job 2: not run: every lane of the sweep had ended" in err
    rows = list(csv.DictReader(io.StringIO((tmp_path / "comparison.csv").read_text())))
    assert [(r["job"], r["overrides"], r["status"]) for r in rows] == [
        ("0", "seed=1", "finished"), ("1", "seed=2", "failed"), ("2", "seed=3", "failed")]


REPORTER = ("import signal, sys, time\n"
            "for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):\n"
            "    signal.signal(s, lambda n, f: print(signal.Signals(n).name, flush=True))\n"
            "print('ready', flush=True)\n"
            "time.sleep(3)\n")


def test_a_signal_the_command_gets_is_handed_to_each_running_lane_once(tmp_path):
    """While the lanes run, the command's signals are noted, not raised (a handler raising in the
    middle of a lane's message lost it: a review); the first is handed to every lane still
    running, once, later ones not (each lane is its own process group: Ctrl-C reaches the command
    only); a lane that has ended gets nothing; the command then stops as the first signal says."""
    lanes_ = [subprocess.Popen([sys.executable, "-c", REPORTER], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for p in lanes_:
        assert p.stdout.readline() == "ready\n"
    runs = lanes.Lanes(None, {}, 3, tmp_path)
    runs.lanes = [lanes._Lane(pid=p.pid, fd=-1, status=None if i < 2 else 0) for i, p in enumerate(lanes_)]
    runs._record(signal.SIGTERM, None)
    runs._signals()
    runs._record(signal.SIGINT, None)
    runs._signals()
    assert [p.communicate(timeout=20)[0] for p in lanes_] == ["SIGTERM\n", "SIGTERM\n", ""]
    with pytest.raises(Stop) as stop:
        runs._outcome()
    assert stop.value.code == 143 and str(stop.value) == "stopped by SIGTERM; every process this run started has been stopped"
    runs.signum = signal.SIGINT
    with pytest.raises(KeyboardInterrupt):  # (cli: exit 130)
        runs._outcome()


def test_a_lanes_message_is_sent_whole_when_a_signal_comes_in_the_middle(monkeypatch):
    """A signal while a lane writes a message is handled after the message is whole (its handler
    raising in the middle of the write lost the rest: a review); the handler's own exception then."""
    read, write = os.pipe()
    real_write, calls = os.write, []

    def write_half_then_signal(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGHUP)  # (noted: send's handler)
            return real_write(fd, bytes(data[:5]))
        return real_write(fd, data)

    def stop(signum, frame):
        raise Stop("stopped by SIGHUP; every process this run started has been stopped", 129)

    before = signal.signal(signal.SIGHUP, stop)
    monkeypatch.setattr(lane_process.os, "write", write_half_then_signal)
    try:
        with pytest.raises(Stop):
            lane_process.send(write, ("job", 3, {"status": "finished"}, [], [], None))
    finally:
        signal.signal(signal.SIGHUP, before)
    os.close(write)
    data = os.read(read, 65536)
    os.close(read)
    assert len(calls) == 2 and lane_process.HEADER.unpack_from(data)[0] == len(data) - 4
    assert pickle.loads(data[4:]) == ("job", 3, {"status": "finished"}, [], [], None)


def test_a_signal_the_command_ignores_stays_ignored_while_the_lanes_run():
    """nohup flmnist -m ..., or a script's background job (SIGINT ignored): noting a signal the
    command ignores made it stop the sweep at its end, after its lanes, which still ignored it,
    had run every job (found by hand)."""
    noted = []
    before = {s: signal.getsignal(s) for s in lane_process.SIGNALS}
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        handlers = lane_process.noting(lane_process.SIGNALS, lambda signum, frame: noted.append(signum))
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert noted == [signal.SIGTERM] and handlers[signal.SIGHUP] is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
