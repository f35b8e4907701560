"""A sweep's jobs in two lanes: two jobs at a time, each lane with its own local SuperLink.

Hydra's launcher runs a sweep's jobs one after the other. On 2 cores a job after the first spends
most of its time training (its start is already shared: :mod:`flmnist.launch.sweep_link`), and
one job at a time leaves part of the cores idle (small batches, the server's steps between
rounds); two at a time, with OpenMP's threads yielding instead of spinning while they wait
(``OMP_WAIT_POLICY=passive``, set for the lanes' processes unless already set), get more done
(``docs/benchmarks.md``, "A sweep that starts Flower once"). Each lane is a forked process of the
command that takes the next job from a queue, runs it as a one-lane sweep would (Hydra's
``run_job``: the same job directory, config record and summary), and sends its outcome back;
the command's process alone writes the comparison table and says how the sweep ended. A lane's
output lines start with ``[job N]``.

``hydra.launcher.lanes``: ``auto`` (the default) runs 2 lanes when the sweep has at least
:data:`MIN_JOBS` jobs and every job's ClientApps run in this process on the CPU
(``simulation=auto`` or ``inprocess`` and no GPU: Ray and GPUs keep one job at a time) and none
logs to MLflow (a sweep's runs share one SQLite store, written by one process at a time), else 1;
an integer sets the number (1: Hydra's one after the other). A job's results do not depend on its
lane: the same threads, seeds and data (``tests/test_cli.py``).

Signals: each lane runs in its own process group, so Ctrl-C reaches the command only, which hands
every signal it gets to the lanes once; each lane stops its job as the command would (the results
so far summarized), and the command exits with the lanes' code. A lane whose command is killed
gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import selectors
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.core.utils import (
    JobReturn,
    JobStatus,
)
from omegaconf import DictConfig

from flmnist.core.errors import ConfigError
from flmnist.launch import sweep_state
from flmnist.launch.comparison import job_overrides
from flmnist.launch.lane_process import HEADER, SIGNALS, noting, run_lane
from flmnist.launch.outcome import INTERRUPTED, Stop

MIN_JOBS = 4  # fewer: each lane would start its own SuperLink for one job or two (measured: no gain at 2)
PLUGIN = "hydra_plugins.flmnist_lanes.LanesLauncher"  # the name Hydra instantiates it by (register)
log = logging.getLogger("hydra")  # (as Hydra's own launcher says which job starts)


def check_lanes(value: Any) -> int | None:
    """``hydra.launcher.lanes``: None for ``auto``, else the number; ConfigError naming the setting."""
    if value == "auto":
        return None
    if isinstance(value, str) and value.strip().isdigit():  # (as given on the command line)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"hydra.launcher.lanes must be auto or an integer >= 1, got {value!r}")
    return value


def one_lane_because(cfg: DictConfig, cores: int) -> str | None:
    """Why a job of ``cfg`` must not share the machine with another job of its sweep, or None."""
    from flmnist.launch.backend import client_gpus, simulation_backend

    logger = cfg.get("logger") or {}
    if "MLflow" in str(logger.get("_target_")) and str(logger.get("tracking_uri") or "sqlite").startswith("sqlite"):
        return "the sweep's runs log to one MLflow SQLite store"
    gpus = client_gpus(cfg)
    if gpus or simulation_backend(cfg, gpus, cores) != "inprocess":
        return "its ClientApps run on Ray or a GPU"
    return None


def lane_count(value: Any, jobs: int, configs: Iterable[DictConfig], cores: int | None = None) -> int:
    """How many lanes a sweep of ``jobs`` jobs (``configs``: theirs, composed) runs in, for
    ``hydra.launcher.lanes=value`` (module docstring); ``cores``: this process's."""
    wanted = check_lanes(value)
    cores = cores or len(os.sched_getaffinity(0))
    if wanted is None and (jobs < MIN_JOBS or cores < 2):
        return 1
    if wanted == 1:
        return 1
    for cfg in configs:
        why = one_lane_because(cfg, cores)
        if why and (wanted is None or why.startswith("the sweep's runs log")):
            if wanted is not None:
                print(f"flmnist: hydra.launcher.lanes={wanted}: one lane, as {why}", flush=True)
            return 1
    return 2 if wanted is None else min(wanted, jobs)


def with_launcher(args: list[str], given: list[str], own_launcher: bool, configs: list[DictConfig]) -> list[str]:
    """A sweep's arguments for Hydra (``given``: its ``hydra.launcher.lanes=`` ones; ``configs``:
    its jobs', composed): with this launcher and the lane count decided here, where the jobs'
    configs are at hand, unless the user named a launcher of their own."""
    if own_launcher or not register():
        if given:
            raise ConfigError(f"{given[-1]}: a setting of flmnist's sweep launcher, which this sweep does not use "
                              "(another hydra/launcher given, or an editable install older than it: pip install -e .)")
        return args
    count = lane_count(given[-1].split("=", 1)[1] if given else "auto", len(configs), configs)
    return [*(a for a in args if a not in given), "hydra/launcher=flmnist_lanes", f"hydra.launcher.lanes={count}"]


@dataclass
class LanesLauncherConf:
    _target_: str = PLUGIN
    lanes: Any = "auto"  # the flmnist command hands a number (with_launcher); auto left as it is: one lane


class LanesLauncher(BasicLauncher):
    """Hydra's basic launcher, with the jobs in lanes when there are enough of them (above); Hydra
    instantiates it by its name in Hydra's plugin package (:data:`PLUGIN`)."""

    def __init__(self, lanes: Any = "auto") -> None:
        super().__init__()
        self.lanes = lanes

    def launch(self, job_overrides, initial_job_idx: int):
        count = min(check_lanes(self.lanes) or 1, len(job_overrides))  # (decided by the command: with_launcher)
        if count <= 1:
            return super().launch(job_overrides, initial_job_idx)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        print(f"flmnist: {len(job_overrides)} jobs in {count} lanes, {count} at a time, each lane with its own local "
              "SuperLink (hydra.launcher.lanes=1: one after the other)", flush=True)
        jobs = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
        return Lanes(self, jobs, count, sweep_dir).run()

    def run_one(self, job: int, overrides: list[str]) -> JobReturn:
        """Job ``job`` in this process: Hydra's basic launcher with that one job."""
        return super().launch([overrides], initial_job_idx=job)[0]


def register() -> bool:
    """Make the launcher known to Hydra, whose scan of its ``hydra_plugins`` package does not find
    an editable install's (:mod:`hydra_plugins.flmnist_lanes`); False where it is not installed
    (an editable install made before it existed: the sweep then runs one job after the other)."""
    try:
        from hydra_plugins.flmnist_lanes import LanesLauncher as Named
    except ImportError:
        return False
    Plugins.instance().register(Named)
    return True


@dataclass
class _Lane:
    pid: int
    fd: int  # its messages' pipe
    buffer: bytes = b""  # what came of its next message so far
    job: int | None = None  # the job it runs
    status: int | None = None  # its wait status, once reaped


class Lanes:
    """The command's side: the lanes forked, fed job numbers, their outcomes gathered. Meanwhile
    the command's signals are only noted (:meth:`_record`) and handed to the lanes from its loop:
    a handler raising in the middle of a message would lose it."""

    def __init__(self, launcher: LanesLauncher, jobs: dict[int, list[str]], count: int, sweep_dir: Path) -> None:
        self.launcher, self.jobs, self.count, self.sweep_dir = launcher, jobs, count, sweep_dir
        self.returns: dict[int, JobReturn] = {}
        self.stops: list[tuple[str, int]] = []
        self.lanes: list[_Lane] = []
        self.signum: int | None = None  # the first signal the command got
        self.handed_on = False  # ... and whether the lanes got it
        self.queue = b"".join(HEADER.pack(j) for j in jobs)  # job numbers not yet handed to a lane
        self.queue_w: int | None = None

    def run(self) -> list[JobReturn]:
        reaping = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # (ignored, waitpid would wait for every child)
        handlers = noting(SIGNALS, self._record)
        queue_r, self.queue_w = os.pipe()
        os.set_blocking(self.queue_w, False)
        try:
            parent = os.getpid()
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # (a lane's own handlers first: _lane)
            try:
                for _ in range(self.count):
                    read, write = os.pipe()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:  # the lane
                        for fd in (read, self.queue_w, *(lane.fd for lane in self.lanes)):
                            os.close(fd)
                        run_lane(self.launcher, self.jobs, queue_r, write, parent, handlers, mask)  # never returns
                    os.close(write)
                    self.lanes.append(_Lane(pid, read))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(queue_r)
            self._gather()
        finally:
            if self.queue_w is not None:
                os.close(self.queue_w)
            for s, handler in handlers.items():
                signal.signal(s, handler)
            signal.signal(signal.SIGCHLD, reaping)
        return self._outcome()

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def _gather(self) -> None:
        """Feed the queue, read the lanes' messages and hand on a signal, until every lane ended."""
        with selectors.DefaultSelector() as sel:
            for lane in self.lanes:
                sel.register(lane.fd, selectors.EVENT_READ, lane)
            sel.register(self.queue_w, selectors.EVENT_WRITE)
            while any(key.data for key in sel.get_map().values()):
                for key, _ in sel.select(timeout=0.2):
                    if key.data is None:  # the queue has room: up to PIPE_BUF at once, whole or nothing
                        try:
                            self.queue = self.queue[os.write(self.queue_w, self.queue[:4096]):]
                        except BlockingIOError:
                            pass
                        except BrokenPipeError:  # every lane has ended: the jobs left fail (_outcome)
                            self.queue = b""
                        if not self.queue:
                            sel.unregister(self.queue_w)
                            os.close(self.queue_w)
                            self.queue_w = None
                        continue
                    lane = key.data
                    chunk = os.read(lane.fd, 65536)
                    if not chunk:
                        sel.unregister(lane.fd)
                        os.close(lane.fd)
                        lane.status = os.waitpid(lane.pid, 0)[1]
                        continue
                    lane.buffer += chunk
                    while len(lane.buffer) >= 4 and len(lane.buffer) >= 4 + (n := HEADER.unpack_from(lane.buffer)[0]):
                        message, lane.buffer = pickle.loads(lane.buffer[4:4 + n]), lane.buffer[4 + n:]
                        self._take(lane, message)
                self._signals()

    def _signals(self) -> None:
        """The first signal the command got is handed to every lane still running, once."""
        if self.signum is not None and not self.handed_on:
            self.handed_on = True
            for lane in self.lanes:
                if lane.status is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(lane.pid, self.signum)

    def _take(self, lane: _Lane, message: tuple) -> None:
        kind, *rest = message
        if kind == "start":
            lane.job = rest[0]
        elif kind == "job":
            job, summary, failed, degraded, error = rest
            lane.job = None
            sweep_state.failed_jobs.extend(failed)
            sweep_state.degraded.extend(degraded)
            try:
                sweep_state.record(self.sweep_dir, job, summary)
            except OSError as err:  # (a full disk: the sweep goes on; the table is written again after the next job)
                print(f"flmnist: the comparison table could not be written ({err})", file=sys.stderr)
            ret = JobReturn(overrides=self.jobs[job], status=JobStatus.COMPLETED if error is None else JobStatus.FAILED)
            ret.return_value = summary if error is None else RuntimeError(f"job {job} failed:\n{error}")
            self.returns[job] = ret
        elif kind == "stop":
            self.stops.append(tuple(rest))
        else:
            print(f"flmnist: error: a lane of the sweep failed: {rest[0]}", file=sys.stderr)

    def _outcome(self) -> list[JobReturn]:
        """The jobs' returns in job order; a job whose lane ended under it, or that no lane took
        because every lane ended, failed (the command exits 1 naming it); a signal stops the command."""
        for message, _ in self.stops[:-1] if self.signum is None else self.stops:
            if not message.endswith(INTERRUPTED.split("; ")[1]):  # where each stopped job's results are (a lane
                print(f"flmnist: {message}", file=sys.stderr)  # stopped between jobs says what the command says)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is not None:
            name = signal.Signals(self.signum).name
            raise Stop(f"stopped by {name}; every process this run started has been stopped", 128 + self.signum)
        if self.stops:
            raise Stop(*self.stops[-1])
        for lane in self.lanes:
            if lane.job is not None and lane.job not in self.returns:
                code = os.waitstatus_to_exitcode(lane.status)
                how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
                self._failed(lane.job, f"its lane (pid {lane.pid}) {how} before the job ended")
        for job in sorted(set(self.jobs) - set(self.returns)):
            self._failed(job, "not run: every lane of the sweep had ended")
        return [self.returns[j] for j in sorted(self.returns)]

    def _failed(self, job: int, why: str) -> None:
        print(f"flmnist: error: job {job}: {why}", file=sys.stderr)
        sweep_state.failed_jobs.append(str(job))
        summary = {**job_overrides(self.jobs[job]), "status": "failed"}
        with contextlib.suppress(OSError):
            sweep_state.record(self.sweep_dir, job, summary)
        self.returns[job] = JobReturn(overrides=self.jobs[job], status=JobStatus.COMPLETED, _return_value=summary)
