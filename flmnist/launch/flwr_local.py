"""Running ``flwr run`` on a private local SuperLink, and stopping exactly what it started.

``flwr run`` starts a detached local SuperLink (and SuperExec, ServerApp and Ray
processes) that outlives the command. We give each launch its own ``FLWR_HOME``
and its own free ports, then stop the processes whose environment carries that
``FLWR_HOME``, by process id: nothing else on the machine is touched. A sweep's jobs share one
(:mod:`flmnist.launch.sweep_link`): each job stops all but its SuperLink and SuperExec.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from flmnist.core.constants import BACKEND_ENV  # read in the simulation process
from flmnist.launch.output import Echo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: str | os.PathLike, base: dict | None = None, ports: tuple[int, int] | None = None) -> dict:
    """Environment for a private local SuperLink: own FLWR_HOME and ports (``ports``: its HTTP and
    Control API ports, those of a SuperLink a sweep shares; else free ones), installed packages only."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    http_port, control_port = ports or (free_port(), free_port())
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # what every Flower process sets at import unless set (flwr.supercore.grpc): said here, so the
    # environment is the same whether or not the process that makes it had imported Flower yet
    env.setdefault("GRPC_VERBOSITY", "error")
    # numpy's BLAS on one thread: an idle OpenBLAS worker spins on a core for up to 0.1 s after
    # each call, the core PyTorch trains and evaluates on (docs/benchmarks.md, "spinning BLAS")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning tip, answered
    return env


def run_env(flwr_home: str | os.PathLike, base: dict | None = None, ports: tuple[int, int] | None = None,
            backend: str = "ray", ray_address: str | None = None) -> dict:
    """:func:`flwr_env` for a run whose ClientApps run on ``backend``, with a Ray cluster at
    ``ray_address``: the environment :func:`run_flwr` gives Flower's processes."""
    env = flwr_env(flwr_home, base, ports)
    # No address: a private Ray ("local"). Left unset, ray.init joins the cluster `ray start` last
    # recorded in its temp dir (ray/ray_current_cluster), the user's own or a dead one.
    env["RAY_ADDRESS"] = ray_address or "local"
    env[BACKEND_ENV] = backend
    return env


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines Flower 1.41 prints whatever the run: a note on a changed default (flmnist always sets
# the number of SuperNodes), how to resize a federation (flmnist does it), the creation of the
# private FLWR_HOME's config, each Ray actor's "Manually terminating" at shutdown, and FedAvg's
# warning that client evaluation is off when sampling.fraction_evaluate=0 was chosen (seed002).
NOISE = ("Since flwr 1.32, default simulated SuperNodes changed", "To change federation size",
         "flwr federation simulation-config", "Flower configuration not found. Created default",
         "Manually terminating ClientAppActor", "fraction_evaluate is set to 0.0. Federated evaluation will be skipped")


def readable(line: str) -> str | None:
    """A line of Flower's output as the user should see it: None for noise (:data:`NOISE`)."""
    return None if any(n in line for n in NOISE) else line


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def pids_with_flwr_home(flwr_home: str | os.PathLike) -> list[int]:
    """Processes whose environment has ``FLWR_HOME=<flwr_home>`` (this process and its parents excluded)."""
    return pids_with_env(f"FLWR_HOME={flwr_home}")


def pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` ("NAME=value"), this process and its parents
    excluded: everything started by a process that was given that entry."""
    marker = entry.encode()
    skip = _ancestors()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in skip:
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def started_at(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone or a zombie: tells a
    process from a later one that got its id."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def program_of(pid: int, names: Sequence[str]) -> str | None:
    """The one of ``names`` that is the program ``pid`` runs (its command line's first two words:
    an executable, or an interpreter and a script), else None."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
    except OSError:
        return None
    found = [Path(a.decode(errors="replace")).name for a in args if a]
    return next((n for n in found if n in names), None)


def parent_of(pid: int) -> int:
    """``pid``'s parent process id (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pids: set[int] | Sequence[int], prune: set[int] = frozenset()) -> set[int]:
    """Every process started by one of ``pids`` (children, their children, ...), but those in
    ``prune`` and theirs. Ray's agents rename themselves (``ray::DashboardAgent``), which blanks
    their environment in /proc: they are found as the raylet's children."""
    found, todo = set(), [pid for pid in pids if pid not in prune]
    while todo:
        pid = todo.pop()
        try:
            with os.scandir(f"/proc/{pid}/task") as entries:
                tasks = [entry.path for entry in entries]
        except OSError:  # it exited since it was found (a run's processes end as it is stopped)
            continue
        for task in tasks:
            try:
                children = [int(c) for c in Path(task, "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                if child not in found and child not in prune:
                    found.add(child)
                    todo.append(child)
    return found


def _signal_all(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop_flwr_home(flwr_home: str | os.PathLike, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process started under ``flwr_home``,
    until none is left (a process may start others while the first ones stop)."""
    return stop_env(f"FLWR_HOME={flwr_home}", grace)


def stop_env(entry: str, grace: float = 5.0, keep: set[int] = frozenset()) -> list[int]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, every process whose environment holds
    ``entry`` (see :func:`pids_with_env`) and every process they started (an orphan stays
    tracked by its id and start time), until none is left; returns their ids. The processes in
    ``keep`` (a sweep's SuperLink and SuperExec) are left running, and what they start is stopped
    only where its environment holds ``entry``."""
    stopped: list[int] = []
    seen: dict[int, int | None] = {}  # pid -> start time
    deadline = time.monotonic() + grace
    quiet = 0  # consecutive scans that found nothing: one may miss a process caught mid-exec
    while quiet < 3:
        found = set(pids_with_env(entry)) - keep
        found |= descendants(found, keep)
        found = {pid for pid in found if started_at(pid) is not None}  # zombies wait to be reaped
        found |= {pid for pid, start in seen.items() if start is not None and started_at(pid) == start}
        for pid in found:
            seen.setdefault(pid, started_at(pid))
        pids = sorted(found)
        quiet = 0 if pids else quiet + 1
        if not pids:
            pass
        elif time.monotonic() < deadline:
            _signal_all([pid for pid in pids if pid not in stopped], signal.SIGTERM)
        elif time.monotonic() < deadline + 30:
            _signal_all(pids, signal.SIGKILL)
        else:
            break  # unkillable (uninterruptible sleep): give up rather than hang
        stopped += [pid for pid in pids if pid not in stopped]
        time.sleep(0.05)
    return stopped


@contextlib.contextmanager
def shielded():
    """Hold SIGINT, SIGTERM and SIGHUP in the block (main thread only), so that a second Ctrl-C
    or signal cannot cut the stopping of what a run started short; one that came is delivered
    once the block ends (ignored, it was lost: a sweep stopped between jobs went on): the first
    that was not ignored before (under nohup a hangup came first, and the SIGTERM after it was lost)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    came: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: came.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        wanted = [s for s in came if previous[s] not in (signal.SIG_IGN, None)]
        if wanted:
            signal.raise_signal(wanted[0])


def write_flower_config(flwr_home: str | os.PathLike) -> Path:
    """``FLWR_HOME/config.toml`` pointing ``flwr run`` at an in-memory local SuperLink: the
    private SuperLink is stopped after the run, so its state needs no SQLite database (whose
    writes cost time on every message)."""
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local-in-memory:"\n')
    return path


def stage_app(app_dir: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy what ``flwr run`` would ship of ``app_dir`` (its ``pyproject.toml`` and the files its
    ``fab-include`` patterns name) into ``dest``, and return ``dest``.

    Flower builds the app bundle by walking and resolving every file under the app folder, which
    took 3 s of each run for a checkout holding its ``.venv``; the staged folder holds only the
    bundle's files, and it also takes ``flwr run``'s rewriting of ``pyproject.toml`` instead of the
    user's file. An app without ``fab-include`` is shipped from where it is."""
    import shutil
    import tomllib

    app_dir, dest = Path(app_dir), Path(dest)
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        return app_dir  # not an app folder: flwr run says so
    app = tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    if not app.get("fab-include"):
        return app_dir
    for pattern in app["fab-include"]:
        for src in app_dir.glob(pattern):
            if src.is_file() and "__pycache__" not in src.parts:
                target = dest / src.relative_to(app_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
    shutil.copyfile(pyproject, dest / "pyproject.toml")
    return dest


def write_run_config(path: str | os.PathLike, overrides: Sequence[str]) -> Path:
    """A run-config TOML file carrying the Hydra overrides (any characters survive, unlike
    ``--run-config 'k="v"'``, whose values cannot hold quotes)."""
    import shlex

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A JSON string with ASCII escapes is a valid TOML basic string.
    path.write_text(f"overrides = {json.dumps(shlex.join(overrides))}\n")
    return path


def flwr_run_command(app_dir: str | os.PathLike, run_config: str | os.PathLike, num_supernodes: int,
                     client_cpus: float | None = None, client_gpus: float | None = None) -> list[str]:
    """``flwr run APP --stream`` with a run-config file, the number of simulated SuperNodes and
    the resources Flower's Ray backend reserves for each ClientApp (None: Flower's default)."""
    federation = [f"num-supernodes={int(num_supernodes)}"]
    if client_cpus is not None:
        federation.append(f"client-resources-num-cpus={client_cpus:g}")
    if client_gpus is not None:
        federation.append(f"client-resources-num-gpus={client_gpus:g}")
    return [
        str(Path(sys.executable).parent / "flwr"), "run", str(app_dir), "--stream",
        "--run-config", str(run_config),
        "--federation-config", " ".join(federation),
    ]


def run_flwr(
    app_dir: str | os.PathLike,
    overrides: Sequence[str],
    num_supernodes: int,
    flwr_home: str | os.PathLike,
    log_path: str | os.PathLike | None = None,
    env: dict | None = None,
    timeout: float | None = None,
    append: bool = False,
    client_cpus: float | None = None,
    client_gpus: float | None = None,
    ray_address: str | None = None,
    backend: str = "ray",
    until: Callable[[str], bool] | None = None,
    ports: tuple[int, int] | None = None,
    stop: Callable[[float], object] | None = None,
    prepare: Callable[[dict], object] | None = None,
) -> int:
    """Run ``flwr run`` on a private local SuperLink, echo and save its output (``append``: add
    to the log), and stop everything it started, also when interrupted (Ctrl-C, a signal handler
    raising): no SuperLink, SuperExec, ServerApp, simulation or Ray process outlives the call.
    ``client_cpus``/``client_gpus``: Ray resources per ClientApp; ``ray_address``: an existing
    Ray cluster for the simulation to join (through ``RAY_ADDRESS``, which ``ray.init`` reads),
    else a private one. ``backend``: where the ClientApps run, ``ray`` (Flower's Ray backend) or
    ``inprocess`` (:mod:`flmnist.flower_patches.inprocess_backend`, in the simulation process).
    ``until``: called with each line of output; once it returns True the run is over by the app's
    own account, and everything is stopped at once rather than after Flower's shutdown (Ray's, and
    the log stream's polling: about 3 s); the call then returns 0. ``ports`` and ``stop`` (called
    with the grace in seconds instead of stopping everything under ``flwr_home``): a sweep's shared
    SuperLink, :mod:`flmnist.launch.sweep_link`, whose ``prepare`` gets the run's environment first."""
    proc, grace, watchdog = None, 5.0, None
    try:  # (from here on, whatever fails stops what runs under flwr_home: a head start's SuperLink runs already)
        app_dir = stage_app(app_dir, Path(flwr_home) / "app")
        cmd = flwr_run_command(app_dir, write_run_config(Path(flwr_home) / "run_config.toml", overrides),
                               num_supernodes, client_cpus, client_gpus)
        env = run_env(flwr_home, env, ports, backend, ray_address)
        write_flower_config(flwr_home)
        if prepare is not None:
            prepare(env)
        with open(log_path, "a" if append else "w") if log_path else contextlib.nullcontext() as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if timeout is not None:  # a timer, not a check per line: a silent hang is killed too
                watchdog = threading.Timer(timeout, proc.kill)
                watchdog.daemon = True
                watchdog.start()
            assert proc.stdout is not None
            colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")  # no escape codes in files and pipes
            echo = Echo(log_path)
            for line in proc.stdout:
                if readable(line) is not None:
                    sys.stdout.write(line if colour else ANSI.sub("", line))
                    sys.stdout.flush()
                    if log:  # the log file without colour codes
                        echo.log(log, ANSI.sub("", line))
                if until is not None and until(line):
                    # The results are on disk: SIGKILL what has not stopped after 1 s with Ray (its
                    # raylet stops its own agents on SIGTERM), at once without it (Flower's
                    # simulation process takes 1 s to wind down its worker threads).
                    grace = 1.0 if backend == "ray" else 0.1
                    return 0
            return proc.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        with shielded():
            (stop or partial(stop_flwr_home, flwr_home))(grace)
            if proc is not None and proc.poll() is None:  # reap flwr run (stopped above)
                proc.kill()
                proc.wait()
