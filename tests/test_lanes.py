"""A sweep's jobs in two lanes (flmnist/launch/lanes.py): how many lanes, what a lane prints, the
table gathered in job order, and real sweeps: every job's results the same as its command run
alone, a failing job isolated, a signal stopping both lanes and everything they started."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

from flmnist.config.compose import compose_config, sweep_jobs
from flmnist.core.errors import ConfigError
from flmnist.launch import lanes, sweep_state
from tests.test_cli import FLMNIST, descendants, processes_with, started_at, wait_until_gone

LANES_LINE = "flmnist: 4 jobs in 2 lanes, two at a time, each lane with its own local SuperLink"


@pytest.mark.parametrize("value", [0, -1, "two", True, 1.5, None])
def test_a_bad_lane_count_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match=r"hydra.launcher.lanes must be auto or an integer >= 1, got "):
        lanes.check_lanes(value)


def test_lanes_auto_means_two_for_four_in_process_jobs_and_one_otherwise():
    configs = [compose_config(job) for job in sweep_jobs(["model=logreg", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, configs, cores=2) == 2
    assert lanes.lane_count("auto", 3, configs[:3], cores=2) == 1  # each lane would start a SuperLink for 1-2 jobs
    assert lanes.lane_count("auto", 4, configs, cores=1) == 1
    ray = [compose_config(job) for job in sweep_jobs(["simulation=ray", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, ray, cores=2) == 1  # Ray's workers take the cores themselves
    mlflow = [compose_config(job) for job in sweep_jobs(["logger=mlflow", "seed=1,2,3,4"])]
    assert lanes.lane_count("auto", 4, mlflow, cores=2) == 1  # one SQLite store for the sweep's runs
    assert lanes.lane_count("3", 4, configs, cores=2) == 3 and lanes.lane_count(8, 4, configs) == 4
    assert lanes.lane_count(1, 4, configs) == 1


def test_a_lanes_lines_start_with_its_jobs_number_even_when_written_in_pieces():
    out, prefix = io.StringIO(), lanes.Prefix()
    stream = lanes.Prefixed(out, prefix)
    prefix.text = "[job 2] "
    stream.write("flmnist: a")
    stream.write("nd more\nnext line\nhalf")
    prefix.text = "[job 3] "
    stream.write(" line\n\nlast\n")
    assert out.getvalue() == "[job 2] flmnist: and more\n[job 2] next line\n[job 2] half line\n[job 3] \n[job 3] last\n"


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
              "client.fault_nodes=[0,1]"]
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
        started = processes_with(marker)
        tracked = {pid: started_at(pid) for pid in {*started, *descendants(started)}}
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
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
