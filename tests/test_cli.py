"""The ``flmnist`` command tells the truth: a bad setting is one line and exit code 2 before
anything starts; a run that did not finish exits non-zero; SIGTERM stops every process the
command started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flmnist.config.compose import group_options, sweep_jobs
from flmnist.core.errors import ConfigError, RunFailed
from flmnist.launch.flwr_local import descendants, pids_with_env, started_at
from flmnist.launch.outcome import finished_line, outcome
from flmnist.launch.output import Echo
from flmnist.launch.sweep_link import parent_of, role_of

FLMNIST = str(Path(sys.executable).parent / "flmnist")


def flmnist(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([FLMNIST, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("args, message", [
    (["client.lr=nan"], "flmnist: error: client.lr must be a finite number > 0, got nan"),
    (["client.lrr=0.1"], "flmnist: error: unknown setting 'client.lrr'; did you mean client.lr? (client=default has: local_epochs, "),
    (["strategy=fedavgg"], "flmnist: error: Unknown strategy 'fedavgg'. Valid options for strategy: bulyan, "),
    # a model setting failed only when the ServerApp built the model, with Flower's traceback
    (["model=mlp", "model.hidden=-3"], "flmnist: error: model.hidden must be an integer >= 1, got -3"),
    # Hydra made the run's directory first and failed with its traceback (exit 1)
    (["output_dir=/proc/flmnist-runs"], "flmnist: error: output_dir=/proc/flmnist-runs: cannot create the folder"),
    # Hydra made hydra.run.dir (a sweep: hydra.sweep.dir, by default multirun/ here) first and failed with
    # its traceback
    (["hydra.run.dir=/proc/flmnist-run/${now:%H}"], "flmnist: error: hydra.run.dir=/proc/flmnist-run: cannot create"),
    (["-m", "seed=1,2", "hydra.sweep.dir=/proc/flmnist-sweep"], "flmnist: error: hydra.sweep.dir=/proc/flmnist-sweep: "),
    (["data=null"], "flmnist: error: data must be a section of settings (change one with data.KEY=VALUE), got None"),
    # a sweep's jobs are checked as Hydra expands them (choice(...) was refused: "Unknown strategy
    # 'choice(fedavg'"), GPU share included (both jobs failed after Hydra started, exit 1)
    (["-m", "strategy=choice(fedavg,fedprox)", "num_rounds=0"], "flmnist: error: num_rounds must be an integer >= 1, got 0"),
    # glob(...) was refused ("ConfigLoader is not set"): its options are listed, each job checked
    (["-m", "experiment=glob(seed00*,exclude=seed002)", "num_rounds=0"],
     "flmnist: error: num_rounds must be an integer >= 1, got 0"),
    (["-m", "experiment=glob(nothing*)"], "flmnist: error: the sweep experiment=glob(nothing*) has no jobs: "),
    (["-m", "simulation=gpu", "seed=1,2"], "flmnist: error: simulation.client_gpus=0.5 asks for a GPU share"),
    (["simulation=gpu"], "flmnist: error: simulation.client_gpus=0.5 asks for a GPU share"),
    # Flower's actor pool came out empty: an error in flwr_run.log after the start (a review)
    (["simulation=ray", "simulation.client_cpus=100000"],
     "flmnist: error: simulation.client_cpus=100000 asks for more cores per ClientApp than this machine has"),
    # the composed config's preview skipped every check: Hydra's multi-line error, exit 1
    (["fleet.dropout=0.1", "--cfg", "job"], "flmnist: error: unknown setting 'fleet.dropout': it belongs to fleet="),
    (["--cfg", "job", "client.lr=nan"], "flmnist: error: client.lr must be a finite number > 0, got nan"),
    (["--cfg=job", "num_nodes=0"], "flmnist: error: num_nodes must be an integer >= 1, got 0"),
    # Hydra's traceback (exit 1) after the checks had passed, an empty sweep folder left behind
    (["-m", "experiment=seed002,null", "num_rounds=1"], ("flmnist: error: experiment=seed002,null: a sweep cannot "
                                                         "take null (no preset) among its experiments")),
    # OmegaConf's traceback, exit 1
    (["~client.lr"], "flmnist: error: client.lr is missing (deleted with ~client.lr?): every run needs it"),
    # the message named sampling.min_available_nodes, set to 2 here: setting it changed nothing
    (["strategy.min_available_nodes=5", "sampling.min_available_nodes=2"],
     "flmnist: error: strategy.min_available_nodes=5 is more than num_nodes=2"),
    (["--num_rounds=3", "--model=logreg"], ("flmnist: error: --num_rounds=3 --model=logreg: settings are Hydra "
                                            "overrides, written without dashes: flmnist num_rounds=3 model=logreg")),
])
def test_a_bad_setting_is_one_line_exit_2_and_creates_nothing(tmp_path, args, message):
    proc = flmnist(args, tmp_path, CUDA_VISIBLE_DEVICES="")  # (no GPU for PyTorch, on any machine)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert list(tmp_path.iterdir()) == [], "a rejected command must create no run directory"


def test_a_file_where_a_sweep_makes_its_folder_is_named(tmp_path):
    (tmp_path / "multirun").write_text("")  # Hydra's default hydra.sweep.dir is multirun/DATE/...
    proc = flmnist(["-m", "seed=1,2", "num_rounds=1"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("flmnist: error: hydra.sweep.dir=multirun: cannot create the folder (a file is "
                                   "in its path); give hydra.sweep.dir a folder you can write to")


def test_a_sweep_expands_glob_to_the_group_options_as_hydra_runs_them():
    jobs = sweep_jobs(["experiment=glob(seed00*,exclude=[seed002,seed003])", "seed=1,2"])
    assert jobs == [[f"experiment={e}", f"seed={s}"] for e in ("seed000", "seed001", "seed002_async") for s in (1, 2)]
    with pytest.raises(ConfigError, match=r"strategy=_sampling: a glob\(...\) matched _sampling, a part the strategy "
                                          r"options share.*strategy='glob\(\*,exclude=_\*\)'"):
        sweep_jobs(["strategy=glob(*)"])
    assert len(sweep_jobs(["strategy=glob(*,exclude=_*)"])) == len(group_options("strategy"))


def test_a_mistyped_option_gets_the_closest_one_suggested(tmp_path):
    proc = flmnist(["strategy=fedavgg"], tmp_path)
    assert proc.stderr.strip().endswith("; did you mean strategy=fedavg?"), proc.stderr


def test_hydra_full_error_adds_the_traceback(tmp_path):
    proc = flmnist(["client.lr=nan"], tmp_path, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("flmnist: error: client.lr must be")


def write_summary(run_dir: Path, **fields) -> None:
    (run_dir / "summary.json").write_text(json.dumps(fields))


def test_only_a_finished_summary_written_by_this_launch_counts_as_success(tmp_path):
    log = tmp_path / "flwr_run.log"
    with pytest.raises(RunFailed, match=f"wrote no summary \\(flwr run exited with 0\\); see {log}"):
        outcome(tmp_path, None, 0)
    write_summary(tmp_path, status="failed", error="RunFailed: 3 rounds in a row without a usable update")
    with pytest.raises(RunFailed, match=f"did not finish \\(status 'failed': RunFailed: 3 rounds.*\\); see {log}"):
        outcome(tmp_path, None, 0)
    write_summary(tmp_path, rounds_completed=3)  # no status at all
    with pytest.raises(RunFailed, match="did not finish \\(status None\\)"):
        outcome(tmp_path, None, 0)
    write_summary(tmp_path, status="finished")
    with pytest.raises(RunFailed, match="flwr run exited with 1"):
        outcome(tmp_path, None, 1)
    assert outcome(tmp_path, None, 0)["status"] == "finished"
    # A resumed run's directory holds the earlier summary: it does not count for this launch.
    st = (tmp_path / "summary.json").stat()
    with pytest.raises(RunFailed, match="wrote no summary"):
        outcome(tmp_path, (st.st_ino, st.st_mtime_ns), 0)


def test_a_resumed_run_is_not_blamed_on_an_earlier_attempts_config_error(tmp_path):
    """A resumed run appends to flwr_run.log: a ConfigError an earlier attempt logged is not this
    launch's cause (exit 2, "nothing ran"); only one logged after the launch's start is."""
    log = tmp_path / "flwr_run.log"
    log.write_text("flmnist.core.errors.ConfigError: screen.registry=x: cannot read it\n")
    start = log.stat().st_size
    with pytest.raises(RunFailed, match="wrote no summary"):
        outcome(tmp_path, None, 1, log_from=start)
    with log.open("a") as f:
        f.write("flmnist.core.errors.ConfigError: fleet.devices: no device has a share\n")
    with pytest.raises(ConfigError, match="^fleet.devices: no device has a share$"):
        outcome(tmp_path, None, 1, log_from=start)


def test_the_command_stops_flower_at_the_last_line_of_a_run_that_wrote_a_finished_summary(tmp_path):
    """Flower's own shutdown (Ray's, the log stream's polling) takes about 3 s after the run is over:
    the command ends it at the line the recorder prints after writing summary.json."""
    last = "INFO :      Run finished: final test accuracy 96.30%, best 96.30% (round 40) ..."
    write_summary(tmp_path, status="finished")
    st = (tmp_path / "summary.json").stat()
    before = (st.st_ino, st.st_mtime_ns)
    done = finished_line(tmp_path, before)
    assert not done(last)  # the summary left by an earlier launch (resume) does not count
    (tmp_path / "summary.json").unlink()
    assert not done(last)
    write_summary(tmp_path, status="finished")
    assert not done.seen  # without the line, the command prints it itself from summary.json
    assert done(last) and done.seen
    assert done("INFO :      [ROUND 3/40]")  # seen stays seen
    assert not finished_line(tmp_path, None)("INFO :      Run failed: final test accuracy -")


def processes_with(marker: str) -> list[int]:
    """Processes (but this one) whose environment holds ``marker``: everything the command started."""
    return pids_with_env(marker)


def describe(pid: int) -> str:
    """A process's state and command line, for the failure message."""
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return f"{state}: {cmdline[:200]}"
    except (OSError, StopIteration):
        return "gone"


@pytest.mark.slow
def test_sigterm_stops_every_process_the_command_started(tmp_path, mnist_root):
    """As ``timeout``, systemd or a batch scheduler stop it: SuperLink, SuperExec, ServerApp,
    simulation and Ray workers must all go, and the exit code must say the run did not finish."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"  # inherited by every process it starts
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([FLMNIST, "model=logreg", "num_nodes=2", "num_rounds=30", "client.local_steps=5"],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not (list(tmp_path.glob("outputs/**/attribution.csv"))  # a round has been trained and recorded
                   and list(tmp_path.glob("outputs/**/summary_sections.json"))):
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not start within 300 s"
            time.sleep(0.2)
        assert len(processes_with(marker)) > 3  # CLI, flwr run, SuperLink, SuperExec, simulation, Ray ...
        # named by the choices made (no experiment, no name): outputs/DATE/TIME_STRATEGY_SPLIT
        run_dir = next(tmp_path.glob("outputs/**/metrics.json")).parent.relative_to(tmp_path)
        assert re.fullmatch(r"outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d_fedavg_iid", str(run_dir)), run_dir
        # Ray's agents blank their environment (setproctitle): they count as the raylet's children
        code, tracked = signalled(proc, marker, signal.SIGTERM, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM
    assert "flmnist: stopped by SIGTERM" in stderr.read_text()
    # The results so far are kept: a summary saying the run was stopped, after its last round
    summary = json.loads((tmp_path / run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and "SIGTERM" in summary["error"], summary
    assert summary["screen"] is not None and "replies_screened" in summary["screen"], summary  # the screen's so far
    assert summary["node_devices"] and summary["attribution"]["totals"], summary  # the other sections so far
    rows = json.loads((tmp_path / run_dir / "metrics.json").read_text())
    assert summary["rounds_completed"] == max(r["round"] for r in rows)
    assert f"results after round {summary['rounds_completed']} in" in stderr.read_text()
    deadline = time.monotonic() + 20  # a killed process may still be exiting on a loaded machine
    def alive() -> list[int]:
        return processes_with(marker) + [p for p, start in tracked.items() if start and started_at(p) == start]

    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: describe(pid) for pid in processes_with(marker)}
    left.update({pid: describe(pid) for pid, start in tracked.items() if start and started_at(pid) == start})
    assert not left, f"processes the command started outlived it: {left}"


def documented_outputs() -> set[str]:
    """The names docs/outputs.md's table of a run directory's files gives (``a.csv/json``: both;
    ``confusion/round_NNNN.csv``: the folder)."""
    names = set()
    for line in (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text().splitlines():
        if line.startswith("| `"):
            for item in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
                if m := re.fullmatch(r"([\w.]+)\.(\w+(?:/\w+)+)", item):
                    names.update(f"{m[1]}.{ext}" for ext in m[2].split("/"))
                else:
                    names.add(item.split("/")[0])
    return names


@pytest.mark.slow
def test_nothing_outlives_a_command_killed_with_sigkill(tmp_path, mnist_root):
    """kill -9 (or the out-of-memory killer): the command cannot stop what it started; its
    watchdog does, within seconds, and removes the private FLWR_HOME. (Before, the detached
    SuperLink and executor ran on, holding their ports, until a reboot.)"""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([FLMNIST, "model=logreg", "num_nodes=2", "num_rounds=30", "client.local_steps=5"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("outputs/**/metrics.json")):  # training has started
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        started = processes_with(marker)
        homes = {entry.split("=", 1)[1] for pid in started for entry in _environ(pid) if entry.startswith("FLWR_HOME=")}
        tracked = {pid: started_at(pid) for pid in {*started, *descendants(started)} if pid != proc.pid}
        assert len(homes) == 1 and len(tracked) > 3, (homes, tracked)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    def alive() -> dict[int, str]:
        return {pid: describe(pid) for pid, start in tracked.items() if start and started_at(pid) == start}

    while (alive() or Path(next(iter(homes))).exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(), f"processes the killed command started outlived it: {alive()}"
    assert not Path(next(iter(homes))).exists()


def test_a_watchdog_exits_once_its_folder_is_removed(tmp_path):
    """After a run's end (or a sweep's fresh SuperLink) the command removes the FLWR_HOME it
    stopped: its watchdog exits then, rather than living as long as the command (one per SuperLink
    a long sweep restarted)."""
    from flmnist.launch.watchdog import watch

    home = tmp_path / "flwr-home"
    home.mkdir()
    proc = watch(home)
    assert proc is not None and watch(home) is None  # one per folder
    time.sleep(1.0)
    assert proc.poll() is None  # watching: this process runs and the folder is there
    home.rmdir()
    assert proc.wait(timeout=10) == 0


def _environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@pytest.mark.slow
def test_a_run_directory_holds_only_documented_files_and_no_empty_log(tmp_path, mnist_root):
    """What a user finds after a run: each file described in docs/outputs.md; one log,
    flwr_run.log (Hydra's empty cli.log is not written). A note on the config (an evaluation
    round past the end) is said once, in the output and in the log (the command said it twice)."""
    out = subprocess.run([FLMNIST, "model=logreg", "num_nodes=2", "num_rounds=1", "client.local_steps=5",
                          "eval.rounds=[3]", "simulation.backend=inprocess", "hydra.run.dir=run"], cwd=tmp_path,
                         capture_output=True,
                         text=True, timeout=600, check=False, env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "cli.log").exists()
    assert [p.name for p in run.rglob("*.log")] == ["flwr_run.log"]
    assert (run / "flwr_run.log").stat().st_size > 0
    note = "eval.rounds lists 3 past num_rounds=1: not reached in this run"
    assert out.stdout.count(note) == 1 and note in (run / "flwr_run.log").read_text(), out.stdout[-3000:]
    undocumented = sorted(p.name for p in run.iterdir() if p.name not in documented_outputs())
    assert not undocumented, f"not described in docs/outputs.md: {undocumented}"


@pytest.mark.slow
@pytest.mark.parametrize("stderr", ["2>stderr.txt", "2>&1"])
def test_a_run_piped_into_head_finishes_with_its_log(tmp_path, mnist_root, stderr):
    """``flmnist ... | head`` (and ``2>&1 | head``, stderr into the same pipe): the reader ends after
    a line; the run goes on (the BrokenPipeError stopped it, exit 2) and finishes, its full output
    in flwr_run.log; where stderr is not the pipe, it says so."""
    script = (f"{FLMNIST} model=logreg num_nodes=2 num_rounds=3 client.local_steps=5 hydra.run.dir=run "
              f"{stderr} | head -1; echo exit=${{PIPESTATUS[0]}}")
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    said = (tmp_path / "stderr.txt").read_text() if stderr != "2>&1" else ""
    assert out.stdout.splitlines()[-1] == "exit=0", out.stdout[-2000:] + said[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    assert "Run finished:" in (tmp_path / "run" / "flwr_run.log").read_text()
    if stderr != "2>&1":
        assert ("flmnist: standard output cannot be written (BrokenPipeError: [Errno 32] Broken pipe); the run goes "
                "on, its output in flwr_run.log") in said


def test_a_stream_that_is_only_busy_is_not_silenced():
    """EAGAIN (a non-blocking stdout, full for a moment) is not an end: that write is lost, the
    run goes on and later lines are written (it was silenced for the rest of the run, unsaid)."""
    import errno

    from flmnist.launch.output import QuietWhenClosed

    class OnceBusy:
        def __init__(self):
            self.busy, self.lines = True, []

        def write(self, text):
            if self.busy:
                self.busy = False
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            self.lines.append(text)
            return len(text)

        def flush(self):
            pass

    stream = OnceBusy()
    out = QuietWhenClosed(stream, "stdout")
    out.write("lost\n")
    out.write("kept\n")
    assert not out.failed and stream.lines == ["kept\n"]


def test_a_log_that_cannot_be_written_ends_the_log_not_the_run(capsys):
    """The log's disk is full (/dev/full): said once, naming the file and the error; no exception."""
    echo = Echo("/dev/full")
    with open("/dev/full", "w") as full:
        echo.log(full, "a line\n")
        echo.log(full, "another\n")
    err = capsys.readouterr().err
    assert err.count("flmnist: cannot write /dev/full (OSError: [Errno 28] No space left on device)") == 1, err
    assert not echo.to_log


def test_the_commands_checks_before_flower_starts_import_no_pytorch(mnist_root):
    """Composing, checking the config and MNIST, and the GPU share, is what the command does alone
    before Flower starts: PyTorch's import (about 1 s) is left to the processes that train or
    evaluate (on a machine without GPU device nodes, as here and in CI)."""
    script = ("import sys\n"
              "from flmnist.launch import cli\n"
              "from flmnist.config.compose import compose_config\n"
              "from flmnist.config.validate import validate\n"
              "from flmnist.launch.backend import client_gpus\n"
              "from flmnist.ml.mnist_files import ensure_mnist, resolve_root\n"
              "cfg = compose_config(['experiment=seed002'])\n"
              "validate(cfg)\n"
              "ensure_mnist(resolve_root(cfg.data.root), cfg.data.download)\n"
              "client_gpus(cfg)\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


SWEEP = ["-m", "model=logreg", "num_nodes=2", "client.local_steps=5"]
SHARED_LINE = re.compile(r"flmnist: job 1: using the sweep's local SuperLink \(pid (\d+), started by job 0\)")
# The sweep starts the SuperLink itself, with the warm simulation executor (sweep_link.warm_up), not flwr run.
WARM_LINE = "flmnist: job 0: local SuperLink with a warm simulation executor"


def signalled(proc: subprocess.Popen, marker: str, signum: int, timeout: float) -> tuple[int, dict[int, int | None]]:
    """Send ``signum`` to the command ``proc``; its exit code, and every process it had started
    then (carrying ``marker``, or their descendants), by id and start time."""
    started = processes_with(marker)
    tracked = {pid: started_at(pid) for pid in {*started, *descendants(started)}}
    proc.send_signal(signum)
    return proc.wait(timeout=timeout), tracked


def wait_until_gone(marker: str, tracked: dict[int, int | None] | None = None, timeout: float = 20) -> dict:
    """The processes carrying ``marker`` (or tracked by id and start time) still there after ``timeout``."""
    def alive() -> dict[int, str]:
        pids = set(processes_with(marker)) | {p for p, s in (tracked or {}).items() if s and started_at(p) == s}
        return {pid: describe(pid) for pid in pids}

    deadline = time.monotonic() + timeout  # a killed process may still be exiting on a loaded machine
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive()


@pytest.mark.slow
def test_a_sweeps_jobs_share_one_superlink_and_nothing_outlives_the_sweep(tmp_path, mnist_root):
    """The first job starts the local SuperLink with the warm simulation executor; the second job's
    run goes to the same one; each job has its own results as before, and the sweep's end stops
    the SuperLink and the executor. Jobs of different names share one sweep directory (each made
    its own, named after it, and the table went to a third, "sweep": a review)."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    proc = subprocess.run([FLMNIST, *SWEEP, "num_rounds=1", "name=first,second"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False,
                          env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Starting local SuperLink" not in out and WARM_LINE in out, out[-4000:]
    assert SHARED_LINE.search(out), out[-4000:]
    [sweep] = (tmp_path / "multirun").glob("*/*")
    assert sweep.name.endswith("_sweep")
    for i in range(2):
        [job] = sweep.glob(f"{i}_*")
        assert json.loads((job / "summary.json").read_text())["status"] == "finished"
        assert "Run finished: final test accuracy" in (job / "flwr_run.log").read_text()
    assert (sweep / "comparison.md").is_file()
    assert not (left := wait_until_gone(marker)), f"processes the sweep started outlived it: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_in_a_sweeps_second_job_stops_its_shared_superlink_too(tmp_path, mnist_root, signum):
    """The SuperLink and executor the first job started run on (detached) into the second job: a
    signal then must stop them with the job's own processes."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    stderr, stdout = tmp_path / "stderr.txt", tmp_path / "stdout.txt"
    with open(stderr, "w") as err, open(stdout, "w") as out:
        proc = subprocess.Popen([FLMNIST, *SWEEP, "num_rounds=1,30"], cwd=tmp_path, env=env, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("multirun/*/*/1_*/metrics.json")):  # the second job trains
            assert proc.poll() is None, stderr.read_text()[-3000:]
            assert time.monotonic() < deadline, "the second job did not start training within 300 s"
            time.sleep(0.2)
        assert SHARED_LINE.search(stdout.read_text()), stdout.read_text()[-3000:]
        code, tracked = signalled(proc, marker, signum, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == (130 if signum == signal.SIGINT else 128 + signum), stderr.read_text()[-3000:]
    # the table of the jobs done is kept (it was written only at the sweep's end: a review)
    [table] = tmp_path.glob("multirun/*/*/comparison.md")
    assert "| 0 | model=logreg num_nodes=2 client.local_steps=5 num_rounds=1 | finished |" in table.read_text()
    assert not (left := wait_until_gone(marker, tracked)), f"processes the command started outlived it: {left}"


@pytest.mark.slow
def test_a_failed_job_leaves_the_shared_superlink_to_the_next_job(tmp_path, mnist_root):
    """The first job fails in its ServerApp (every update non-finite): the second job's run still
    goes to the sweep's SuperLink and finishes; the sweep exits 1, naming the failed job."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    proc = subprocess.run([FLMNIST, *SWEEP, "num_rounds=1", "max_failed_rounds=1", "client.fault_nodes=[0,1]",
                           "client.fault=nan,null"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False,
                          env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "flmnist: error: 1 sweep job(s) did not finish: 0" in proc.stderr
    assert SHARED_LINE.search(out) and WARM_LINE in out and "Starting local SuperLink" not in out, out[-4000:]
    [sweep] = (tmp_path / "multirun").glob("*/*_sweep")
    statuses = [json.loads(next(sweep.glob(f"{i}_*/summary.json")).read_text())["status"] for i in range(2)]
    assert statuses == ["failed", "finished"]
    assert not (left := wait_until_gone(marker)), f"processes the sweep started outlived it: {left}"


@pytest.mark.slow
def test_a_sweep_job_whose_simulation_process_is_killed_fails_at_once_and_the_next_job_runs(tmp_path, mnist_root):
    """The warm executor's forked simulation of job 0 is killed mid-run (SIGKILL: no exit handler
    of Flower's runs): the executor reports the run failed, so job 0 ends within seconds instead of
    after Flower's task expiry (about a minute), and job 1 runs on the same SuperLink and finishes."""
    marker = f"FLMNIST_TEST_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), marker.split("=")[0]: marker.split("=")[1]}
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([FLMNIST, *SWEEP, "num_rounds=150,2"], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("multirun/*/*/0_*/metrics.json")):  # job 0 trains
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        [child] = [pid for pid in processes_with(marker) if role_of(pid) == "flmnist-warm-executor"
                   and role_of(parent_of(pid)) == "flmnist-warm-executor"]  # forked by the executor
        os.kill(child, signal.SIGKILL)
        killed = time.monotonic()
        while "flmnist: error: job 0:" not in log.read_text():
            assert time.monotonic() - killed < 30, log.read_text()[-3000:]  # Flower's task expiry: about 60 s
            time.sleep(0.2)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert code == 1 and "flmnist: error: 1 sweep job(s) did not finish: 0" in out, out[-3000:]
    assert SHARED_LINE.search(out), out[-3000:]
    [sweep] = (tmp_path / "multirun").glob("*/*_sweep")
    assert not list(sweep.glob("0_*/summary.json"))  # killed before it could write one
    assert json.loads(next(sweep.glob("1_*/summary.json")).read_text())["status"] == "finished"
    assert not (left := wait_until_gone(marker)), f"processes the sweep started outlived it: {left}"


def test_the_printed_resume_command_works_for_a_sweep_jobs_directory(tmp_path):
    """A sweep job's directory holds '=' and ',' (0_seed=1,strategy=fedprox): the resume command
    the command prints passes through the shell and Hydra to that directory (it printed
    resume='DIR', whose quotes the shell removes: "bad override ... mismatched input '='")."""
    import shlex

    from flmnist.core.run_files import resume_arg

    job = tmp_path / "multirun" / "0_seed=1,strategy=fedprox"
    job.mkdir(parents=True)
    assert resume_arg(tmp_path / "plain_run-1") == f"resume={tmp_path}/plain_run-1"
    line = f"{shlex.quote(FLMNIST)} {resume_arg(job)} num_rounds=4"
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"no checkpoint at {job / 'checkpoint.pt'}" in proc.stderr, proc.stderr


def test_a_sweep_over_experiments_has_one_directory_and_names_each_jobs_folder(mnist_root, monkeypatch):
    """experiment=seed000,seed001: each job resolved the sweep directory to its own name (two
    folders, the table in a third) and the jobs' folders did not say which experiment they ran."""
    from flmnist.launch.cli import hydra_arguments

    monkeypatch.setenv("FLMNIST_DATA_DIR", str(mnist_root))
    args = hydra_arguments(["-m", "experiment=seed000,seed001", "num_rounds=1"])
    assert "hydra.sweep.dir=multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}_sweep" in args
    assert "hydra.job.config.override_dirname.exclude_keys=[data.root,run_dir]" in args
    same = hydra_arguments(["-m", "experiment=seed000", "seed=1,2"])
    assert not any(a.startswith(("hydra.sweep.dir=", "hydra.job.config")) for a in same)


def test_output_dir_under_a_quoted_tilde_is_the_home_folder_and_an_empty_one_is_refused(tmp_path, mnist_root,
                                                                                          monkeypatch):
    """``output_dir='~/runs'`` (the ~ left to flmnist by the quotes): flmnist's checks made
    $HOME/runs, Hydra wrote the run to ./~/runs, and resume=latest then looked in $HOME/runs; an
    empty output_dir put the run in /DATE/TIME_NAME (a review)."""
    from flmnist.launch.cli import hydra_arguments

    monkeypatch.setenv("FLMNIST_DATA_DIR", str(mnist_root))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for given in ("output_dir='~/runs'", "output_dir=~/runs"):
        args = hydra_arguments([given, "num_rounds=1"])
        assert f"output_dir='{tmp_path / 'home' / 'runs'}'" in args and (tmp_path / "home" / "runs").is_dir(), args
    assert not (tmp_path / "~").exists()
    from flmnist.core.run_files import home_expanded

    # a sweep's list of folders is Hydra's to split: left as given
    assert home_expanded(["output_dir=~/a,~/b", "++output_dir=~/c"]) == ["output_dir=~/a,~/b",
                                                                        f"++output_dir='{tmp_path / 'home' / 'c'}'"]
    with pytest.raises(ConfigError, match=r"^output_dir is empty; give a folder, e.g. output_dir=outputs$"):
        hydra_arguments(["output_dir=", "num_rounds=1"])


def test_a_numeric_name_passes_the_check_hydras_config_gets_as_it_passed_the_first(tmp_path):
    """``flmnist name=42``: compose_config (before Hydra) made it the name "42" and passed it; the
    job then checked Hydra's own config, where it is the integer 42, and failed with its run
    directory made (a review). The job's check reads it as the first did."""
    from hydra import compose, initialize_config_dir

    from flmnist.config.compose import compose_config, conf_dir
    from flmnist.launch.cli import checked

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["name=42"])
    assert cfg.name == 42
    assert checked(cfg).name == "42" == compose_config(["name=42"]).name


def test_a_stop_whose_summary_cannot_be_written_still_stops_the_command(tmp_path, monkeypatch):
    """Writing a stopped run's summary on a full disk raised OSError out of the stop: a sweep then
    counted one job failed and went on, with SIGTERM ignored from then on (a review)."""
    import errno

    from flmnist.config.compose import compose_config
    from flmnist.launch import cli, outcome

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outcome, "summarize_stopped", full)
    stop = cli.stopped(cli.Stop("stopped by SIGTERM; every process this run started has been stopped", 143),
                       compose_config(["model=logreg"]), tmp_path, None)
    assert isinstance(stop, cli.Stop) and stop.code == 143
    assert str(stop).startswith("stopped by SIGTERM; every process this run started has been stopped; its results so "
                                "far could not be summarized (OSError: [Errno 28] No space left on device)")
    assert cli.stopped(KeyboardInterrupt(), compose_config(["model=logreg"]), tmp_path, None).code == 130


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["model=logreg"]], ids=["version", "help", "run"])
def test_a_missing_conf_folder_is_one_error_line_for_every_command(tmp_path, args):
    """conf/ was looked up when the command's module was imported: a traceback ending in the
    well-worded error, for --help and --version too (a review). --version needs no conf/."""
    proc = subprocess.run([FLMNIST, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "FLMNIST_CONF_DIR": str(tmp_path)})
    if args == ["--version"]:
        assert proc.returncode == 0 and proc.stdout.startswith("flmnist "), proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"flmnist: error: No config.yaml in {tmp_path}. Install flmnist from its repository with "
                           "`pip install -e .` (the conf/ folder lives beside the package) or set FLMNIST_CONF_DIR.\n")
    assert not (tmp_path / "outputs").exists()


def test_a_run_directory_is_held_by_one_command_at_a_time(tmp_path):
    """Two runs with the same name started in the same second share Hydra's directory and wrote the
    same files at once (a review): the second is refused, in one line saying why; the directory is
    free again once the first lets go (its command ended, kill -9 too: the kernel drops the lock)."""
    import os

    from flmnist.core.run_files import hold_run_dir

    first = hold_run_dir(tmp_path, resume=False)
    try:
        with pytest.raises(ConfigError, match=rf"^the run directory {tmp_path} is in use by another flmnist command "
                                              r"\(one started in the same second with the same name gets the same "
                                              r"directory\): start this one again, or give it a name= of its own$"):
            hold_run_dir(tmp_path, resume=False)
    finally:
        os.close(first)
    os.close(hold_run_dir(tmp_path, resume=True))


def flocked_by(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` holds an exclusive flock on ``folder`` (read from /proc/locks: trying
    the lock here could make the command find its directory held)."""
    inode = f":{os.stat(folder).st_ino}"
    return any(f[1:5] == ["FLOCK", "ADVISORY", "WRITE", str(pid)] and f[5].endswith(inode)
               for f in (line.split() for line in Path("/proc/locks").read_text().splitlines()) if len(f) > 5)


def test_a_plain_command_holds_its_default_directory_and_says_nothing_of_hydra_callbacks(tmp_path, mnist_root):
    """The default run directory's name reads Hydra's runtime choices: the hold callback failed to
    resolve it, with a Hydra UserWarning on every command, and held nothing; so did the comparison
    table's callback on a single run, which has no job number."""
    proc = subprocess.Popen([FLMNIST, "model=logreg", "num_rounds=1", f"output_dir={tmp_path}"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    held = False
    try:
        while proc.poll() is None and not held:
            held = any(flocked_by(proc.pid, folder) for folder in tmp_path.glob("*/*_fedavg_iid"))
            time.sleep(0.02)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert held, "the run directory was never held while the command ran"
    assert "Callback" not in err, err
    runs = list(tmp_path.glob("*/*"))
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file(), runs  # the one it held is the one Hydra used


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_a_command_whose_directory_another_holds_ends_before_hydra_writes_there(tmp_path, mnist_root, sweep):
    """Refused in the job, the second of two same-second commands had already had Hydra write its
    record (.hydra/) over the first's; and two sweeps sharing a directory rewrote each other's
    comparison table (a review). The command's directory is held when Hydra starts it."""
    import fcntl

    folder = tmp_path / ("sweep" if sweep else "run")
    folder.mkdir()
    held = os.open(folder, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    args = ["-m", f"hydra.sweep.dir={folder}", "seed=1,2"] if sweep else [f"hydra.run.dir={folder}"]
    try:
        proc = subprocess.run([FLMNIST, *args, "model=logreg", "num_rounds=1"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False, env={**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)})
    finally:
        os.close(held)
    what = "sweep directory" if sweep else "run directory"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"flmnist: error: the {what} {folder} is in use by another flmnist command"), proc.stderr
    assert list(folder.iterdir()) == []
