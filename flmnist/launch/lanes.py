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
import ctypes
import logging
import os
import pickle
import selectors
import signal
import struct
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.plugins import Plugins
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from omegaconf import DictConfig, open_dict

from flmnist.core.errors import ConfigError, RunFailed
from flmnist.launch import sweep_state

MIN_JOBS = 4  # fewer: each lane would start its own SuperLink for one job or two (measured: no gain at 2)
PLUGIN = "hydra_plugins.flmnist_lanes.LanesLauncher"  # the name Hydra instantiates it by (register)
_HEADER = struct.Struct("<I")
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


def lane_count(value: Any, jobs: int, configs: Iterable[DictConfig], cores: int | None = None) -> int:
    """How many lanes a sweep of ``jobs`` jobs (``configs``: theirs, composed) runs in, for
    ``hydra.launcher.lanes=value`` (module docstring)."""
    wanted = check_lanes(value)
    if wanted is not None:
        return min(wanted, jobs)
    if jobs < MIN_JOBS or (cores or os.cpu_count() or 1) < 2:
        return 1
    from flmnist.launch.backend import client_gpus, simulation_backend

    for cfg in configs:
        gpus = client_gpus(cfg)
        if gpus or simulation_backend(cfg, gpus) != "inprocess":
            return 1
        if "MLflow" in str((cfg.get("logger") or {}).get("_target_")):  # (a sweep's runs share its mlflow.db)
            return 1
    return 2


@dataclass
class LanesLauncherConf:
    _target_: str = PLUGIN
    lanes: Any = "auto"  # auto: 2 for 4 jobs or more whose ClientApps run in process on the CPU, else 1


class LanesLauncher(BasicLauncher):
    """Hydra's basic launcher, with the jobs in lanes when there are enough of them (above); Hydra
    instantiates it by its name in Hydra's plugin package (:data:`PLUGIN`)."""

    def __init__(self, lanes: Any = "auto") -> None:
        super().__init__()
        self.lanes = lanes

    def launch(self, job_overrides, initial_job_idx: int):
        count = self.lane_count(job_overrides)
        if count <= 1:
            return super().launch(job_overrides, initial_job_idx)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        print(f"flmnist: {len(job_overrides)} jobs in {count} lanes, two at a time, each lane with its own local "
              "SuperLink (hydra.launcher.lanes=1: one after the other)", flush=True)
        jobs = {initial_job_idx + i: list(o) for i, o in enumerate(job_overrides)}
        return Lanes(self, jobs, count, sweep_dir).run()

    def lane_count(self, job_overrides) -> int:
        configs = (self.hydra_context.config_loader.load_sweep_config(self.config, list(o)) for o in job_overrides)
        return lane_count(self.lanes, len(job_overrides), configs)

    def run_one(self, job: int, overrides: list[str]) -> JobReturn:
        """Job ``job`` in this process, as Hydra's basic launcher runs it."""
        log.info(f"\t#{job} : {' '.join(filter_overrides(overrides))}")
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = job
            config.hydra.job.num = job
        ret = run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret


def register() -> None:
    """Make the launcher known to Hydra, whose scan of its ``hydra_plugins`` package does not find
    an editable install's: :mod:`hydra_plugins.flmnist_lanes`."""
    from hydra_plugins.flmnist_lanes import LanesLauncher as Named

    Plugins.instance().register(Named)


class Lanes:
    """The command's side: the lanes forked, fed job numbers, their outcomes gathered."""

    def __init__(self, launcher: LanesLauncher, jobs: dict[int, list[str]], count: int, sweep_dir: Path) -> None:
        self.launcher, self.jobs, self.count, self.sweep_dir = launcher, jobs, count, sweep_dir
        self.returns: dict[int, JobReturn] = {}
        self.stops: list[tuple[str, int]] = []
        self.errors: list[str] = []
        self.pids: list[int] = []
        self.buffers: dict[int, bytes] = {}  # a lane's pipe -> what came of its next message so far

    def run(self) -> list[JobReturn]:
        queue_r, queue_w = os.pipe()
        os.write(queue_w, b"".join(_HEADER.pack(j) for j in self.jobs))  # (a sweep of 16,384 jobs fits a pipe)
        os.close(queue_w)
        results = []
        for _ in range(self.count):
            read, write = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the lane
                os.close(read)
                for fd in results:
                    os.close(fd)
                _lane(self.launcher, self.jobs, queue_r, write)  # never returns
            os.close(write)
            results.append(read)
            self.pids.append(pid)
        os.close(queue_r)
        self.buffers = dict.fromkeys(results, b"")
        try:
            self._gather()
        except BaseException as stop:  # a signal (Stop, KeyboardInterrupt): the lanes stop their jobs
            signum = getattr(stop, "code", 130) - 128
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum if signum in (signal.SIGTERM, signal.SIGHUP) else signal.SIGINT)
            with _shielded():
                self._gather()
            for message, _ in self.stops:  # where each lane's job left its results, and how to continue it
                print(f"flmnist: {message}", file=sys.stderr)
            raise
        return self._outcome()

    def _gather(self) -> None:
        """Read the lanes' messages until every lane has ended, then reap them."""
        with selectors.DefaultSelector() as sel:
            for fd in self.buffers:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                for key, _ in sel.select():
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        del self.buffers[key.fd]
                        continue
                    self.buffers[key.fd] += chunk
                    while len(buf := self.buffers[key.fd]) >= 4 and len(buf) >= 4 + (n := _HEADER.unpack_from(buf)[0]):
                        self.buffers[key.fd] = buf[4 + n:]
                        self._take(pickle.loads(buf[4:4 + n]))
        for pid in self.pids:
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                if os.waitstatus_to_exitcode(status) < 0 and not self.stops:
                    self.errors.append(f"a lane (pid {pid}) was killed by signal {-os.waitstatus_to_exitcode(status)}")
        self.pids = []

    def _take(self, message: tuple) -> None:
        kind, *rest = message
        if kind == "job":
            job, summary, failed, degraded = rest
            sweep_state.failed_jobs.extend(failed)
            sweep_state.degraded.extend(degraded)
            sweep_state.record(self.sweep_dir, job, summary)
            ret = JobReturn(overrides=self.jobs[job], status=JobStatus.COMPLETED)
            ret.return_value = summary
            self.returns[job] = ret
        elif kind == "stop":
            self.stops.append(tuple(rest))
        else:
            self.errors.append(rest[0])

    def _outcome(self) -> list[JobReturn]:
        for message, _ in self.stops[:-1]:
            print(f"flmnist: {message}", file=sys.stderr)
        if self.stops:
            from flmnist.launch.outcome import Stop

            raise Stop(*self.stops[-1])
        missing = sorted(set(self.jobs) - set(self.returns))
        if self.errors or missing:
            raise RunFailed("the sweep's lanes failed" + (f" (jobs {', '.join(map(str, missing))} did not run)"
                                                           if missing else "") + ": " + "; ".join(self.errors))
        return [self.returns[j] for j in sorted(self.returns)]


@contextlib.contextmanager
def _shielded():
    """Further signals do not cut short the wait for the lanes (they have theirs already)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _send(fd: int, message: tuple) -> None:
    data = pickle.dumps(message)
    os.write(fd, _HEADER.pack(len(data)) + data)  # (a lane's messages are its own pipe's)


def _lane(launcher: LanesLauncher, jobs: dict[int, list[str]], queue: int, out: int) -> None:
    """A lane: run the queue's next job until it is empty; never returns."""
    code = 0
    try:
        os.setpgid(0, 0)  # the terminal's Ctrl-C reaches the command, which hands it on once
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the command killed
        if os.getppid() == 1:
            raise SystemExit(1)
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        sweep_state.in_lane = True
        prefix = Prefix()
        sys.stdout, sys.stderr = Prefixed(sys.stdout, prefix), Prefixed(sys.stderr, prefix)
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)  # (to the new streams)
        while len(raw := os.read(queue, 4)) == 4:
            job = _HEADER.unpack(raw)[0]
            prefix.text = f"[job {job}] "
            failed, degraded = len(sweep_state.failed_jobs), len(sweep_state.degraded)
            launcher.run_one(job, jobs[job])
            summary = sweep_state.table.get(job) or {"status": "failed"}
            _send(out, ("job", job, summary, sweep_state.failed_jobs[failed:], sweep_state.degraded[degraded:]))
    except BaseException as err:  # noqa: BLE001
        code = getattr(err, "code", None)
        if type(err).__name__ == "Stop":
            _send(out, ("stop", str(err), code))
        elif isinstance(err, KeyboardInterrupt):
            from flmnist.launch.outcome import INTERRUPTED

            code = 130
            _send(out, ("stop", INTERRUPTED, 130))
        elif not isinstance(err, SystemExit):
            code = 1
            _send(out, ("error", "".join(traceback.format_exception(err)).strip()))
    finally:
        with contextlib.suppress(BaseException):
            sweep_state.close_links()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


class Prefix:
    text = ""


class Prefixed:
    """A lane's ``sys.stdout`` or ``sys.stderr``: each line starts with its job's ``[job N]``."""

    def __init__(self, stream, prefix: Prefix) -> None:
        self._stream, self._prefix, self._at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_start:
                out.append(self._prefix.text)
            out.append(piece)
            self._at_start = piece.endswith("\n")
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding ...
        return getattr(self._stream, name)
