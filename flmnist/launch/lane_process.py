"""One lane of a sweep (:mod:`flmnist.launch.lanes`): the forked process that runs the queue's
next job until it is empty and sends each job's outcome to the command, in whole messages (a
4-byte length, then the pickled message)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import signal
import struct
import sys
import traceback

from hydra.core.utils import JobStatus, configure_log

from flmnist.launch import sweep_state
from flmnist.launch.comparison import job_overrides

HEADER = struct.Struct("<I")  # a message's length; a job number in the queue
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}  # what stops a sweep (cli: exit 130, 143, 129)


def noting(signals, note) -> dict:
    """Each of ``signals`` the process does not ignore (``nohup``; SIGINT in a script's background
    job) goes to ``note`` from now on; returns every one's handler before."""
    handlers = {s: signal.getsignal(s) for s in signals}
    for s, handler in handlers.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, note)
    return handlers


def send(fd: int, message: tuple) -> None:
    """One message to the command, whole: a signal meanwhile is noted, then handled."""
    data = memoryview(HEADER.pack(len(body := pickle.dumps(message))) + body)
    got: list[int] = []
    handlers = noting(SIGNALS, lambda signum, frame: got.append(signum))
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if got and callable(handler := handlers[got[0]]):  # (Ctrl-C's: KeyboardInterrupt; cli's SIGTERM: Stop)
        handler(got[0], None)


def run_lane(launcher, jobs: dict[int, list[str]], queue: int, out: int, parent: int, handlers: dict,
             mask) -> None:
    """A lane (``launcher``: the sweep's :class:`~flmnist.launch.lanes.LanesLauncher`): run the
    queue's next job until it is empty; never returns. (Forked with the command's signals
    blocked: unblocked here, once its handlers are the command's own again.)"""
    code = 0
    try:
        os.setpgid(0, 0)  # the terminal's Ctrl-C reaches the command, which hands it on once
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: the command killed
        if os.getppid() != parent:
            raise SystemExit(1)
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        sweep_state.in_lane = True
        prefix = Prefix()
        sys.stdout, sys.stderr = Prefixed(sys.stdout, prefix), Prefixed(sys.stderr, prefix)
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)  # (to the new streams)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        while len(raw := os.read(queue, 4)) == 4:  # (the command writes whole job numbers)
            job = HEADER.unpack(raw)[0]
            send(out, ("start", job))
            prefix.text = f"[job {job}] "
            failed, degraded = len(sweep_state.failed_jobs), len(sweep_state.degraded)
            ret = launcher.run_one(job, jobs[job])
            error = None
            if ret.status == JobStatus.FAILED:  # (an error of flmnist's is a failed summary; this is a bug's)
                error = "".join(traceback.format_exception(ret._return_value)).strip()
            summary = sweep_state.table.get(job) or {**job_overrides(jobs[job]), "status": "failed"}
            send(out, ("job", job, summary, sweep_state.failed_jobs[failed:], sweep_state.degraded[degraded:], error))
    except BaseException as err:  # noqa: BLE001
        code = getattr(err, "code", None)
        if type(err).__name__ == "Stop":
            send(out, ("stop", str(err), code))
        elif isinstance(err, KeyboardInterrupt):
            from flmnist.launch.outcome import INTERRUPTED

            code = 130
            send(out, ("stop", INTERRUPTED, 130))
        elif not isinstance(err, SystemExit):
            code = 1
            send(out, ("error", "".join(traceback.format_exception(err)).strip()))
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
        out, pieces = [], text.split("\n")  # (a line ends in \n only: a progress line's \r keeps its prefix)
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            if self._at_start and (piece or not last):
                out.append(self._prefix.text)
                self._at_start = False
            out.append(piece if last else piece + "\n")
            self._at_start = self._at_start or not last
        self._stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding ...
        return getattr(self._stream, name)
