"""A single run's SuperLink and warm executor, started before the command composes its config.

Before Flower starts, ``flmnist experiment=seed002`` imports Hydra and composes and checks the
config on one core (about 1.3 s on 2 cores); then the warm simulation executor
(:mod:`flmnist.launch.warm_link`) imports Flower, PyTorch and the server's libraries, about 3.5 s
of one core, and the run it is handed waits for those imports: they were the run's critical path
(the executor's log: its imports done 2 s after the run was submitted). So when the command line
looks like one run whose ClientApps run in process (no flag such as ``-m`` or ``--cfg``, no Ray,
GPU or ``simulation`` setting; fewer than 4 cores and no GPU, where ``simulation=auto`` runs them in
process; Flower 1.41.0), :func:`begin` starts the private SuperLink and the warm
executor first thing, with a new FLWR_HOME and ports, and they import beside the composition.

The run takes them over (:meth:`HeadStart.prepare`) only if its environment and working directory
are the very ones they were started with (a setting that changes it, such as another backend or a Ray address, finds them
stopped and starts afresh, as without a head start). If the command ends before (a bad setting,
an interrupt), :func:`discard` stops them and removes the folder (once ``run_flwr`` has called
their ``prepare``, its own stop does); a ``kill -9`` leaves them to the
folder's watchdog. ``FLMNIST_HEAD_START=0`` turns the head start off.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from flmnist.launch import warm_link
from flmnist.launch.backend import gpu_device_nodes, machine_cores, one_at_a_time
from flmnist.launch.flwr_local import run_env, shielded, stop_env
from flmnist.launch.watchdog import watch

SWITCH = "FLMNIST_HEAD_START"
DEFAULT_CLIENT_CPUS = 2  # conf/simulation/auto.yaml's client_cpus (the config is not composed yet)
NOT_TAKEN = ("the SuperLink started ahead of the config does not fit this run (another environment or working "
             "directory): starting afresh")


@dataclass
class HeadStart:
    """The FLWR_HOME, ports, environment and processes of a head start."""

    home: str
    ports: tuple[int, int]
    env: dict
    cwd: str  # (Hydra's hydra.job.chdir=true moves the command; Flower's processes start where it is)
    procs: list = field(default_factory=list)

    def prepare(self, env: dict) -> bool:
        """``run_flwr``'s ``prepare`` for the run's ``env``: wait for the SuperLink started ahead
        if ``env`` is the one it was started with, else stop both and start what the run needs."""
        if self in _ahead:  # from here on run_flwr stops what runs under FLWR_HOME, however it ends
            _ahead.remove(self)
        wanted, had = warm_link.started_env(env), self.env
        if wanted == had and os.getcwd() == self.cwd:
            return warm_link.up(self.procs, env)
        differ = sorted(k for k in wanted.keys() | had.keys() if wanted.get(k) != had.get(k))
        print(f"flmnist: {NOT_TAKEN} (differing: {', '.join(differ) or 'the working directory'})", flush=True)
        with shielded():
            stop_env(f"FLWR_HOME={self.home}", grace=0)  # (they served nothing yet)
        return warm_link.start_if_applies(env)


_ahead: list[HeadStart] = []  # the head start not yet claimed by the run (at most one)


def likely(args: list[str], environ: dict | None = None, cores: int | None = None, gpu: bool | None = None) -> bool:
    """Whether a command line ``args`` probably runs one job with ClientApps in process (on a machine
    with ``cores`` cores and, if ``gpu``, a GPU: this one's by default)."""
    environ = os.environ if environ is None else environ
    if environ.get(SWITCH, "1") == "0" or any(a.startswith("-") for a in args):
        return False  # (-m, --cfg, --help ...: a sweep, or no run at all)
    keys = [a.split("=", 1)[0].lstrip("+~").lower() for a in args]
    if any(k.startswith(("hydra.mode", "hydra/", "hydra.sweep")) for k in keys):
        return False  # (a sweep all the same)
    if any(word in k for k in keys for word in ("ray", "gpu", "simulation")):
        return False  # (where ClientApps run is set: left to the config)
    if not one_at_a_time(machine_cores() if cores is None else cores, DEFAULT_CLIENT_CPUS):
        return False  # (simulation.backend=auto runs Ray workers there)
    return not (gpu_device_nodes() if gpu is None else gpu) and warm_link.flower_fits()  # (or takes the GPU)


def begin(args: list[str]) -> None:
    """Start the SuperLink and warm executor for the command line ``args`` if it is :func:`likely`
    a run they serve; :func:`claim` hands them to the run."""
    if _ahead or not likely(args):
        return
    try:
        home = tempfile.mkdtemp(prefix="flmnist-flwr-home-")
    except OSError:
        return  # (the run says what is wrong with the temporary folder)
    atexit.register(discard)
    try:
        env = run_env(home, backend="inprocess")  # what run_flwr gives a run in process, on a private Ray
        ahead = HeadStart(home, (int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]),
                                 int(env["FLWR_LOCAL_CONTROL_API_PORT"])), warm_link.started_env(env), os.getcwd())
        _ahead.append(ahead)
        watch(home)
        ahead.procs = warm_link.spawn(env)
    except Exception:  # noqa: BLE001 - (no port, no process to spare) a head start is an optimisation: none
        if not _ahead:
            shutil.rmtree(home, ignore_errors=True)
        discard()


def claim() -> HeadStart | None:
    """The head start, for the run to use (its FLWR_HOME and ports, and :meth:`HeadStart.prepare`);
    None if there is none. :func:`discard` still stops it at the command's exit until ``run_flwr``
    calls its ``prepare`` (a Ctrl-C or a full disk in between would otherwise leave it running)."""
    return _ahead[0] if _ahead else None


def discard() -> None:
    """Stop an unclaimed head start's processes and remove its folder."""
    while _ahead:
        ahead = _ahead.pop()
        with shielded():
            stop_env(f"FLWR_HOME={ahead.home}", grace=0)  # (they served nothing)
        shutil.rmtree(ahead.home, ignore_errors=True)
