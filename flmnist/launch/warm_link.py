"""A private local SuperLink whose simulations are forked by flmnist's warm executor.

``flwr run`` (Flower 1.41) with ``address = ":local-in-memory:"`` starts, when none answers on
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, ``flower-superlink --simulation --isolation subprocess``,
whose SuperExec starts a new ``flwr-simulation`` process for the run: a new Python importing
Flower, PyTorch and the app, 3.1-3.5 s on 2 cores before the ServerApp's first line. :func:`start`
starts the same SuperLink first, in ``--isolation process``, with ``flmnist-warm-executor
--task-type simulation`` in the SuperExec's place (:mod:`flmnist.flower_patches.warm_simulation`):
its imports begin while ``flwr run`` starts, and the run's simulation is a forked child. ``flwr
run`` then finds the SuperLink answering and submits to it. Both carry the run's environment
(its ``FLWR_HOME``), so whatever stops a run's processes stops them too.

Only for ClientApps in process (``simulation.backend=inprocess``, what ``auto`` picks without
GPUs or a Ray cluster) and Flower 1.41.0; otherwise, and if the two do not come up, ``flwr run``
starts Flower's own as before.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from flmnist.core.constants import BACKEND_ENV
from flmnist.launch.flwr_local import pids_with_flwr_home, program_of, shielded, stop_env

SUPERLINK, WARM = "flower-superlink", "flmnist-warm-executor"
STARTUP_TIMEOUT = 15.0  # seconds for the SuperLink to answer (flwr run's own limit for its start)


def answers(http_port: int | str) -> bool:
    """Whether a SuperLink answers ``/health`` on ``http_port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as reply:
            return 200 <= reply.status < 300
    except (OSError, ValueError):
        return False


def applies(env: dict) -> bool:
    """Whether a run with environment ``env`` gets the warm executor (see the module's text)."""
    return env.get(BACKEND_ENV) == "inprocess" and flower_fits()


def flower_fits() -> bool:
    """Whether the installed Flower is the one the warm executor follows."""
    from flmnist.flower_patches.pinned import installed_flower_version, version_refusal

    return version_refusal(installed_flower_version()) is None


def spawn(env: dict) -> list[subprocess.Popen]:
    """Start the SuperLink and the warm executor with ``env`` (a run's, from ``flwr_env``: its
    FLWR_HOME and ports), without waiting; those that started (both, unless the system refused a
    process). :func:`up` waits for them."""
    home, http, control = env["FLWR_HOME"], env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]
    logs = Path(home) / "local-superlink"
    logs.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    commands = [[str(bindir / SUPERLINK), "--insecure", "--simulation", "--isolation", "process",
                 "--control-api-address", f"127.0.0.1:{control}", "--host", "127.0.0.1", "--port", str(http)],
                [str(bindir / WARM), "--task-type", "simulation", "--runtime-api-address", f"127.0.0.1:{http}",
                 "--insecure", "--max-children", "1"]]
    env = started_env(env)
    procs = []
    try:
        for command in commands:
            with open(logs / f"{Path(command[0]).name}.log", "ab") as log:
                procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                              start_new_session=True))
    except OSError:
        pass  # (said by up: what did start is stopped)
    return procs


def started_env(env: dict) -> dict:
    """The environment :func:`spawn` gives the two processes for a run's ``env``."""
    return {**env, "FLWR_DISABLE_UPDATE_CHECK": "1"}  # as flwr run's own start: flwr run checked already


def up(procs: list[subprocess.Popen], env: dict) -> bool:
    """Wait until the SuperLink :func:`spawn` started with ``env`` answers; True if both run. On
    failure what started is stopped, it is said on stdout, and ``flwr run`` starts Flower's own."""
    home, http = env["FLWR_HOME"], env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    logs = Path(home) / "local-superlink"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    running = len(procs) == 2
    while running and not answers(http) and time.monotonic() < deadline:
        time.sleep(0.05)
        running = all(p.poll() is None for p in procs)
    if running and answers(http) and all(p.poll() is None for p in procs):
        threading.Thread(target=_watch, args=(*procs, home, logs), daemon=True).start()
        return True
    print(f"flmnist: the warm simulation executor did not start (see {logs}); flwr run starts Flower's own",
          flush=True)
    with shielded():
        stop_env(f"FLWR_HOME={home}")
    return False


def start(env: dict) -> bool:
    """:func:`spawn`, then :func:`up`: True if the SuperLink answers and both run."""
    return up(spawn(env), env)


def _watch(superlink: subprocess.Popen, executor: subprocess.Popen, home: str, logs: Path) -> None:
    """If the executor exits while its SuperLink runs on (not stopped with it) and no child of it
    runs a simulation, no run would ever be taken: say so and stop everything under ``home``,
    which ends the waiting ``flwr run``. An executor that exited 0 (it stops so on SIGTERM) or was
    ended by SIGTERM was stopped with the run (``flmnist`` stops everything at its end): its SuperLink
    is given 30 s to stop too, not 3 (a slow SuperLink stop was reported as the executor exiting)."""
    code = executor.wait()
    try:
        superlink.wait(timeout=30 if code in (0, -signal.SIGTERM) else 3)
    except subprocess.TimeoutExpired:
        if any(program_of(pid, [WARM]) for pid in pids_with_flwr_home(home)):
            return  # a simulation child it forked runs on and finishes its run
        print(f"flmnist: the warm simulation executor exited (code {code}; see {logs}): stopping the run",
              flush=True)
        with shielded():
            stop_env(f"FLWR_HOME={home}")


def start_if_applies(env: dict) -> bool:
    """:func:`start` for a single run (``flmnist`` without ``-m``) where it applies."""
    return applies(env) and start(env)
