"""The command's output: a copy that cannot be written ends, the run does not.

``flmnist ... | head`` closes standard output after a line; a full disk fails the log's writes.
Either ends that copy, said once on stderr, and the run goes on: its results are the server's
files (summary, metrics, models), not these copies of its output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys

GONE = {errno.EPIPE, errno.ECONNRESET, errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # a stream that ended


class QuietWhenClosed:
    """``sys.stdout`` or ``sys.stderr`` for the command (:func:`install`): once a write or flush
    fails for good (:data:`GONE`: a pipe's reader ended, a full disk), the descriptor points at /dev/null and what follows
    goes nowhere, quietly; stdout's end is said once on stderr, if stderr can still say it."""

    def __init__(self, stream, name: str) -> None:
        self._stream, self._name = stream, name
        self.failed = False

    def write(self, text: str) -> int:
        return self._guarded(self._stream.write, text) or len(text)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except OSError as err:
            if err.errno not in GONE:  # (EAGAIN on a non-blocking stream, full for a moment: this write is lost)
                return None
            if not self.failed:
                self.failed = True
                to_devnull(self._stream)
                if self._name == "stdout":
                    say(f"flmnist: standard output cannot be written ({type(err).__name__}: {err}); the run goes "
                        "on, its output in flwr_run.log in the run's directory")
            return None

    def __getattr__(self, name):  # isatty, fileno, encoding ...
        return getattr(self._stream, name)


def install() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` :class:`QuietWhenClosed` (once): ``flmnist ... 2>&1 |
    head`` closes both."""
    if not isinstance(sys.stdout, QuietWhenClosed):
        sys.stdout = QuietWhenClosed(sys.stdout, "stdout")
    if not isinstance(sys.stderr, QuietWhenClosed):
        sys.stderr = QuietWhenClosed(sys.stderr, "stderr")


def say(line: str) -> None:
    """One line on stderr; nothing (no error) if stderr cannot take it."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


class Echo:
    """The run's log, copied line by line from Flower's output stream (the screen's copy is
    ``sys.stdout``'s): a write that fails ends the log, said once."""

    def __init__(self, log_path: str | os.PathLike | None) -> None:
        self.log_path = log_path
        self.to_log = True

    def log(self, file, text: str) -> None:
        if self.to_log and (error := _write(file, text)) is not None:
            self.to_log = False
            to_devnull(file)  # (what it still buffers, flushed as it closes, too)
            say(f"flmnist: cannot write {self.log_path} ({error}); the run goes on without its log")


def to_devnull(file) -> None:
    """Point ``file``'s descriptor at /dev/null: its writes and flushes succeed from now on."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, file.fileno())
        os.close(null)


def _write(file, text: str) -> str | None:
    """Write and flush ``text``: None, or what the failed write raised."""
    try:
        file.write(text)
        file.flush()
    except (OSError, ValueError) as err:  # ValueError: a closed file
        return f"{type(err).__name__}: {err}"
    return None
