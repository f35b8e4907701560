"""A sweep's shared local SuperLink (flmnist.launch.sweep_link), without Flower: stand-in
``flower-superlink`` (answering ``/health``) and ``flower-superexec`` programs and a job's process,
all under the sweep's FLWR_HOME. A job's end stops the job's process only; a SuperLink that died
or stopped answering, or a job on another backend, gets a fresh FLWR_HOME; closing stops it all."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flmnist.core.constants import BACKEND_ENV
from flmnist.launch import warm_link
from flmnist.launch.flwr_local import flwr_env, pids_with_flwr_home, started_at
from flmnist.launch.sweep_link import SweepLink, parent_of, role_of

SUPERLINK = f"""#!{sys.executable}
import http.server, os
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
port = int(os.environ["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
SLEEPER = f"#!{sys.executable}\nimport time\ntime.sleep(600)\n"
FORKER = f"#!{sys.executable}\nimport os, time\nos.fork()\ntime.sleep(600)\n"  # the warm executor and a child


@pytest.fixture
def programs(tmp_path) -> Path:
    for name, text in (("flower-superlink", SUPERLINK), ("flower-superexec", SLEEPER), ("flwr-simulation", SLEEPER),
                       ("flmnist-warm-executor", FORKER)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    return tmp_path


@pytest.fixture
def link():
    """A sweep's link; afterwards closed, and every stand-in started under it killed if still up."""
    made = SweepLink()
    made.started = []
    yield made
    made.close()
    for p in made.started:
        if p.poll() is None:
            p.kill()
            p.wait()


def start(programs: Path, link: SweepLink, *names: str) -> list[subprocess.Popen]:
    env = flwr_env(link.home, ports=link.ports)
    procs = [subprocess.Popen([str(programs / name)], env=env, start_new_session=True) for name in names]
    link.started.extend(procs)
    return procs


def wait_for_health(link: SweepLink) -> None:
    deadline = time.monotonic() + 30
    while not link.healthy():
        assert time.monotonic() < deadline, "the stand-in SuperLink did not answer within 30 s"
        time.sleep(0.1)


def forked_children(home: str, executor: subprocess.Popen) -> list[int]:
    """The stand-in warm executor's forked children under ``home``, once it has forked and they exec'd."""
    deadline = time.monotonic() + 30
    while len(children := [p for p in pids_with_flwr_home(home) if parent_of(p) == executor.pid]) < 1:
        assert time.monotonic() < deadline, "the stand-in executor did not fork"
        time.sleep(0.1)
    time.sleep(0.3)  # the programs exec'd
    return children


def test_a_job_end_keeps_the_superlink_and_superexec_and_stops_the_rest(programs, link, capsys):
    home = link.home_for(0, ("inprocess", None))
    assert "flmnist: job 0" not in capsys.readouterr().out  # the first job says nothing more
    procs = start(programs, link, "flower-superlink", "flower-superexec", "flwr-simulation")
    time.sleep(0.5)  # the programs exec'd
    assert {role_of(p.pid) for p in procs} == {"flower-superlink", "flower-superexec", None}
    stopped = link.end_job(grace=2)
    assert stopped == [procs[2].pid]
    procs[2].wait(timeout=10)
    assert all(p.poll() is None for p in procs[:2])
    wait_for_health(link)
    assert link.home_for(1, ("inprocess", None)) == home
    assert (f"flmnist: job 1: using the sweep's local SuperLink (pid {procs[0].pid}, started by job 0)"
            in capsys.readouterr().out)
    # Its SuperExec gone: the next job starts a fresh one, after stopping what is left
    procs[1].kill()
    procs[1].wait(timeout=10)
    assert not link.healthy()
    fresh = link.home_for(2, ("inprocess", None))
    assert fresh != home and not Path(home).exists()
    assert "job 2: the sweep's local SuperLink is not up or does not answer: starting a fresh" in \
        capsys.readouterr().out
    procs[0].wait(timeout=10)
    assert pids_with_flwr_home(home) == []
    assert link.started_by == 2


def test_another_backend_gets_a_fresh_superlink_and_closing_stops_everything(programs, link, capsys):
    home = link.home_for(0, ("inprocess", None))
    procs = start(programs, link, "flower-superlink", "flower-superexec")
    time.sleep(0.5)
    link.end_job(grace=2)
    wait_for_health(link)
    assert link.home_for(1, ("ray", None)) != home
    assert "job 1: it runs with another simulation backend or Ray address: starting a fresh" in \
        capsys.readouterr().out
    for p in procs:
        p.wait(timeout=10)
    procs = start(programs, link, "flower-superlink", "flower-superexec")
    time.sleep(0.5)
    tracked = {p.pid: started_at(p.pid) for p in procs}
    link.close()
    link.close()  # (again: nothing to do)
    for p in procs:
        p.wait(timeout=10)
    assert not any(started_at(pid) == start for pid, start in tracked.items())
    assert link.home is None


def test_a_job_whose_superlink_did_not_start_leaves_nothing_for_the_next(programs, link):
    link.home_for(0, ("inprocess", None))
    [job] = start(programs, link, "flwr-simulation")
    time.sleep(0.5)
    assert link.end_job(grace=2) == [job.pid]
    job.wait(timeout=10)
    assert link.kept == {} and not link.healthy()


def test_warm_up_leaves_a_ray_sweep_and_a_running_superlink_to_flower(link, capsys):
    """The warm simulation executor is for ClientApps in process only (a Ray sweep: Flower's own
    SuperExec, started by flwr run), and once per SuperLink: with one kept, nothing is started."""
    link.home_for(0, ("ray", None))
    env = flwr_env(link.home, ports=link.ports)
    link.warm_up({**env, BACKEND_ENV: "ray"})
    link.kept = {"flower-superlink": (1, None), "flower-superexec": (2, None)}
    link.warm_up({**env, BACKEND_ENV: "inprocess"})
    assert pids_with_flwr_home(link.home) == [] and not link.warm
    assert capsys.readouterr().out == ""
    link.kept = {}


def test_a_job_end_keeps_the_warm_executor_and_stops_its_forked_child(programs, link):
    """A forked simulation child runs the executor's program too: the job's end keeps the executor
    (the child's parent) and the SuperLink, and stops the child."""
    home = link.home_for(0, ("inprocess", None))
    superlink, executor = start(programs, link, "flower-superlink", "flmnist-warm-executor")
    children = forked_children(home, executor)
    assert role_of(children[0]) == role_of(executor.pid) == "flmnist-warm-executor"
    assert link.end_job(grace=2) == children
    assert {role: pid for role, (pid, _) in link.kept.items()} == {"flower-superlink": superlink.pid,
                                                                   "flmnist-warm-executor": executor.pid}
    wait_for_health(link)


def test_a_killed_warm_executors_orphaned_child_is_not_kept_as_the_executor(programs, link):
    """The warm executor is killed -9 mid-job; its forked child runs on, an orphan, under the
    executor's program name. The job's end must not keep that orphan as the sweep's executor (the
    next job's run was then queued on a SuperLink with no executor, and waited for ever): it
    stops everything, and the next job starts afresh."""
    import os
    import signal

    home = link.home_for(0, ("inprocess", None))
    superlink, executor = start(programs, link, "flower-superlink", "flmnist-warm-executor")
    children = forked_children(home, executor)
    link.kept, link.warm = link._kept(), True  # as warm_up found them
    os.kill(executor.pid, signal.SIGKILL)
    executor.wait()
    assert link.end_job(grace=2) and link.kept == {}
    assert children[0] not in pids_with_flwr_home(home) and superlink.wait(timeout=10) is not None


def test_an_executor_gone_before_any_run_stops_the_run_and_one_whose_child_runs_on_does_not(programs, link, capsys):
    """warm_link's watch: the warm executor exits while its SuperLink runs on; with no child of it
    running a simulation nothing would take the run, so everything under FLWR_HOME is stopped
    (ending the waiting flwr run) and it is said; an orphaned child finishes its run undisturbed."""
    home = link.home_for(0, ("inprocess", None))
    superlink, executor = start(programs, link, "flower-superlink", "flower-superexec")  # no child
    watch = threading.Thread(target=warm_link._watch, args=(superlink, executor, home, Path(home)))
    watch.start()
    executor.kill()
    watch.join(timeout=30)
    assert not watch.is_alive() and superlink.wait(timeout=10) is not None
    assert "flmnist: the warm simulation executor exited" in capsys.readouterr().out
    superlink, executor = start(programs, link, "flower-superlink", "flmnist-warm-executor")  # forks a child
    deadline = time.monotonic() + 30
    while not [p for p in pids_with_flwr_home(home) if parent_of(p) == executor.pid]:
        assert time.monotonic() < deadline, "the stand-in executor did not fork"
        time.sleep(0.1)
    time.sleep(0.3)
    watch = threading.Thread(target=warm_link._watch, args=(superlink, executor, home, Path(home)))
    watch.start()
    executor.kill()
    watch.join(timeout=30)
    assert not watch.is_alive() and superlink.poll() is None
    assert capsys.readouterr().out == ""


def test_an_executor_stopped_with_its_run_is_not_reported_while_the_superlink_takes_seconds_to_stop(
        programs, link, capsys):
    """flmnist's stop at a run's end SIGTERMs the executor and its SuperLink; a SuperLink that took
    more than 3 s to stop had the watch print that the executor exited and stop the run again."""
    import signal

    home = link.home_for(0, ("inprocess", None))
    ready = programs / "ready"
    (programs / "flower-superexec").write_text(  # as the warm executor does: a clean stop on SIGTERM, exit 0
        f"#!{sys.executable}\nimport pathlib, signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(600)\n")
    superlink, executor = start(programs, link, "flower-superlink", "flower-superexec")
    watch = threading.Thread(target=warm_link._watch, args=(superlink, executor, home, Path(home)))
    watch.start()
    deadline = time.monotonic() + 30
    while not ready.exists():  # its handler in place
        assert time.monotonic() < deadline, "the stand-in executor did not start"
        time.sleep(0.05)
    executor.send_signal(signal.SIGTERM)
    assert executor.wait(timeout=10) == 0
    time.sleep(4)  # the SuperLink stops 4 s later
    assert watch.is_alive() and superlink.poll() is None
    superlink.send_signal(signal.SIGTERM)
    watch.join(timeout=30)
    assert not watch.is_alive() and capsys.readouterr().out == ""


def test_a_warm_start_that_fails_says_so_and_leaves_nothing_running(link, capsys):
    """The SuperLink cannot bind its port (taken): warm_link.start gives up as soon as it exits,
    says so, and stops what it started, so that flwr run starts Flower's own SuperLink."""
    home = link.home_for(0, ("inprocess", None))
    env = {**flwr_env(home, ports=link.ports), BACKEND_ENV: "inprocess"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", link.ports[0]))
        taken.listen()
        began = time.monotonic()
        assert warm_link.start_if_applies(env) is False
    assert time.monotonic() - began < warm_link.STARTUP_TIMEOUT
    assert "flmnist: the warm simulation executor did not start" in capsys.readouterr().out
    assert pids_with_flwr_home(home) == []
