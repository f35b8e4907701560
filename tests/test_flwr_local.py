"""What the flmnist command hands to ``flwr run``: only the app bundle's files, staged away from the
checkout (Flower walks every file under the app folder, its .venv included, to build the bundle)."""

from __future__ import annotations

import signal
import time
import tomllib
from pathlib import Path

import pytest

from flmnist.launch.flwr_local import flwr_env, readable, run_flwr, stage_app, write_flower_config

REPO = Path(__file__).resolve().parents[1]


def test_the_staged_app_holds_the_bundles_files_and_nothing_else(tmp_path):
    staged = stage_app(REPO, tmp_path / "app")
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "pyproject.toml" in files
    assert {"flmnist/server_app.py", "flmnist/client_app.py", "flmnist/engine/guard.py",
            "conf/config.yaml", "conf/experiment/seed002.yaml"} <= files
    assert all(f == "pyproject.toml" or (f.startswith("flmnist/") and f.endswith(".py"))
               or (f.startswith("conf/") and f.endswith(".yaml")) for f in files), files
    assert not any("__pycache__" in f or f.startswith(("tests/", ".venv/", "benchmarks/")) for f in files)
    # the same sources, byte for byte
    assert (staged / "flmnist/protocol/screen.py").read_bytes() == (REPO / "flmnist/protocol/screen.py").read_bytes()


def test_an_app_without_fab_include_is_shipped_from_where_it_is(tmp_path):
    app = tmp_path / "plain"
    app.mkdir()
    (app / "pyproject.toml").write_text('[tool.flwr.app]\npublisher = "me"\n')
    assert stage_app(app, tmp_path / "staged") == app
    assert stage_app(tmp_path / "nothing", tmp_path / "staged") == tmp_path / "nothing"  # flwr run will say why
    assert not (tmp_path / "staged").exists()


def test_the_private_superlink_keeps_its_state_in_memory(tmp_path):
    config = tomllib.loads(write_flower_config(tmp_path).read_text())
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["local"]["address"] == ":local-in-memory:"


def test_a_chosen_setting_is_not_echoed_as_a_warning_and_real_warnings_are():
    chosen = "\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.\n"
    assert readable(chosen) is None
    real = "\x1b[93mWARNING \x1b[0m:   Node 3 was not added: node-info keys ...\n"
    assert readable(real) == real


def test_flower_gets_numpys_blas_on_one_thread_unless_the_user_chose(tmp_path):
    """An idle OpenBLAS worker spins on a core after each call, the core PyTorch needs."""
    assert flwr_env(tmp_path, {})["OPENBLAS_NUM_THREADS"] == "1"
    assert flwr_env(tmp_path, {"OPENBLAS_NUM_THREADS": "4"})["OPENBLAS_NUM_THREADS"] == "4"


SILENT_SERVER = """import time
from flwr.serverapp import ServerApp
app = ServerApp()
@app.main()
def main(grid, context):
    time.sleep(600)  # a hang that prints nothing
"""


@pytest.mark.slow  # starts Flower
def test_a_run_that_hangs_without_a_line_of_output_is_stopped_at_its_timeout(tmp_path):
    """The timeout was checked only when a line of output arrived: a silent hang ran forever."""
    app = tmp_path / "silent"
    (app / "silent").mkdir(parents=True)
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "silent"\nversion = "1.0.0"\n[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "flmnist"\n'
        '[tool.flwr.app.components]\nserverapp = "silent.server_app:app"\nclientapp = "silent.client_app:app"\n'
        '[tool.flwr.app.config]\noverrides = ""\n')
    (app / "silent" / "__init__.py").write_text("")
    (app / "silent" / "server_app.py").write_text(SILENT_SERVER)
    (app / "silent" / "client_app.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    log = tmp_path / "run.log"
    started = time.monotonic()
    code = run_flwr(app, [], 1, tmp_path / "home", log_path=log, timeout=25)
    took = time.monotonic() - started
    assert code == -signal.SIGKILL, log.read_text()
    assert 25 <= took < 60, took


def test_a_signal_during_a_shielded_block_is_delivered_after_it_not_lost():
    """shielded() ignored SIGINT/SIGTERM/SIGHUP, so the kernel dropped them: a sweep stopped while
    a job's processes were being stopped went on with its next job (a review). The signal now
    reaches the handler once the block ends; one that was ignored before stays ignored."""
    import os
    import signal

    from flmnist.launch.flwr_local import shielded

    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held in the block
        assert got == [signal.SIGTERM]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with shielded():
            os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_after_an_ignored_hangup_in_a_shielded_block_is_delivered():
    """Under nohup SIGHUP is ignored; a hangup and then a SIGTERM during the block delivered only the
    first that came, the ignored hangup, so the SIGTERM was lost and a sweep went on (a review)."""
    import os
    import signal

    from flmnist.launch.flwr_local import shielded

    got: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum)), signal.signal(signal.SIGHUP,
                                                                                                   signal.SIG_IGN)
    try:
        with shielded():
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGTERM)
        assert got == [signal.SIGTERM] and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGHUP, before[1])


def test_nohup_flmnist_keeps_ignoring_a_hangup():
    """main() put its own SIGHUP handler over the 'ignore' nohup had set: closing the terminal
    stopped a run started with nohup (a review)."""
    import subprocess
    import sys

    code = ("import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); sys.argv = ['flmnist', '--version']\n"
            "from flmnist.launch.cli import main; main()\n"
            "print('ignored' if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else 'handled')")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("ignored"), out.stdout + out.stderr


def test_a_process_that_exits_while_its_tasks_are_listed_is_skipped(monkeypatch):
    """Stopping a run lists each process's threads in /proc/PID/task: one that exited between being
    found and its threads being read raised FileNotFoundError out of the cleanup (seen in CI, as a
    run hung past its timeout was stopped). Here the process's /proc entry vanishes at that moment;
    the other's children are still found."""
    import os
    import subprocess

    from flmnist.launch import flwr_local

    parent = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 10
        while not flwr_local.descendants({parent.pid}) and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = flwr_local.descendants({parent.pid})
        real = os.scandir

        def scandir(path="."):
            if str(path) == "/proc/1/task":  # as if pid 1 had exited since it was listed
                raise FileNotFoundError(2, "No such file or directory", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        assert flwr_local.descendants([1, parent.pid], prune={child}) == set()  # no error; pid 1 skipped
        assert child in flwr_local.descendants([1, parent.pid])
    finally:
        parent.kill()
        parent.wait()
