"""Nothing outlives a killed ``flmnist``: a watchdog beside each private FLWR_HOME.

The command stops everything it started on every way out it sees (the end of a run, a bad
reply, a signal it can catch). ``kill -9`` or the out-of-memory killer it cannot see: the
detached SuperLink and executor (their own sessions) would run on. :func:`watch` starts
``python -m flmnist.launch.watchdog PID START FLWR_HOME`` once per FLWR_HOME: in its own
session, with only the interpreter's and locale's environment (it is under no FLWR_HOME and
carries nothing of the run's), its output nowhere. Once the command's process (PID, started at
START) is gone, however it ended, it stops every process under FLWR_HOME, by process id, and
removes the folder; once the command removed the folder itself (it stopped what ran there), it
exits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from flmnist.launch.flwr_local import started_at, stop_env

POLL_S = 0.5
_watched: set[str] = set()  # the FLWR_HOMEs this process has a watchdog for


def watch(flwr_home: str | os.PathLike) -> subprocess.Popen | None:
    """Start the watchdog of ``flwr_home`` for this process (once per folder); its process."""
    home = str(flwr_home)
    if home in _watched:
        return None
    _watched.add(home)
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("PYTHON", "LC_", "LD_")) or k in ("PATH", "LANG", "HOME", "TMPDIR", "VIRTUAL_ENV")}
    try:
        return subprocess.Popen([sys.executable, "-m", "flmnist.launch.watchdog", str(os.getpid()),
                          str(started_at(os.getpid())), home], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                close_fds=True)
    except OSError as err:  # (no process to spare): the run goes on, as it did without one
        print(f"flmnist: no watchdog for {home} ({err}): if this command is killed with SIGKILL, stop what it "
              f"started under that FLWR_HOME yourself", file=sys.stderr, flush=True)
        return None


def main(pid: int, start: int, flwr_home: str) -> None:
    """Wait until the command is gone (then stop what runs under ``flwr_home``) or the folder is
    (the command stopped its processes and removed it: a run's end, a sweep's fresh SuperLink)."""
    while started_at(pid) == start:
        if not os.path.isdir(flwr_home):
            return  # the command removed it (or something else did, under a live run: not ours to end)
        time.sleep(POLL_S)
    stop_env(f"FLWR_HOME={flwr_home}")
    shutil.rmtree(flwr_home, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
