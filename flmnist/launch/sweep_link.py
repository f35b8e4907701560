"""One private local SuperLink for every job of a sweep (``flmnist -m``).

What ``flwr run`` (Flower 1.41) starts, with ``address = ":local-in-memory:"``:

- once, when no SuperLink answers on ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (the first job):
  ``flower-superlink --simulation --isolation subprocess``, detached (its own session), which
  starts ``flower-superexec`` (detached too, watching the SuperLink's pid); later ``flwr run``s
  with the same ``FLWR_HOME`` and ports find it healthy and submit their run to it;
- per run: the ``flwr run`` command itself (our child; it streams the run's log) and, started by
  the SuperExec when the run is queued, ``flwr-simulation``: the ServerApp and the ClientApps (in
  process, or Ray's workers and agents, the Ray processes all its descendants or carrying its
  environment).

Every one of them carries ``FLWR_HOME`` in its environment (the SuperLink's is the first job's,
handed down to the SuperExec and each ``flwr-simulation``). At a job's end everything under the
sweep's ``FLWR_HOME`` but the SuperLink and SuperExec (found by their command, by process id and
start time) is stopped; before the next job both must still run and the SuperLink must answer its
health check, else everything under that ``FLWR_HOME`` is stopped and the job starts a fresh one
(and says so). A job whose simulation backend or Ray address differ from the SuperLink's (its
environment is the first job's) gets a fresh one too. :meth:`SweepLink.close` stops it all.

Warm (:meth:`SweepLink.warm_up`, with ClientApps in process and Flower 1.41.0): before the first
job's ``flwr run``, the sweep starts the SuperLink itself with flmnist's warm executor in the
SuperExec's place (:mod:`flmnist.launch.warm_link`): Flower, PyTorch and the server's libraries
are imported once, and each job's simulation is a forked child instead of a new
``flwr-simulation`` process.
"""

from __future__ import annotations

import shutil
import tempfile

from flmnist.launch import warm_link
from flmnist.launch.flwr_local import (
    free_port,
    parent_of,
    pids_with_flwr_home,
    program_of,
    shielded,
    started_at,
    stop_env,
)
from flmnist.launch.warm_link import SUPERLINK, WARM

SUPEREXEC = "flower-superexec"
ROLES = (SUPERLINK, SUPEREXEC, WARM)  # what stays up between a sweep's jobs: the SuperLink and one executor


def role_of(pid: int) -> str | None:
    """One of ``ROLES`` when that is the program ``pid`` runs, else None."""
    return program_of(pid, ROLES)


class SweepLink:
    """The sweep's FLWR_HOME, ports and kept processes (the SuperLink and its SuperExec)."""

    def __init__(self) -> None:
        self.home: str | None = None
        self.ports: tuple[int, int] | None = None
        self.key: tuple | None = None  # (backend, Ray address): the environment the SuperLink passes on
        self.kept: dict[str, tuple[int, int | None]] = {}  # role -> (pid, start time)
        self.started_by: int | None = None  # the job whose flwr run started the SuperLink
        self.warm = False  # whether the sweep started the SuperLink with the warm executor (warm_up)

    def home_for(self, job: int, key: tuple) -> str:
        """The FLWR_HOME for ``job``: the sweep's, when its SuperLink is up and answers (and ``key``
        matches), else a fresh one; says which on stdout."""
        if self.home is not None:
            why = ("it runs with another simulation backend or Ray address" if key != self.key
                   else None if self.healthy() else "the sweep's local SuperLink is not up or does not answer")
            if why is None:
                pid = self.kept["flower-superlink"][0]
                print(f"flmnist: job {job}: using the sweep's local SuperLink (pid {pid}, started by job "
                      f"{self.started_by})", flush=True)
                return self.home
            print(f"flmnist: job {job}: {why}: starting a fresh local SuperLink", flush=True)
            self.close()
        self.home = tempfile.mkdtemp(prefix="flmnist-flwr-home-")
        self.ports = (free_port(), free_port())
        self.key, self.kept, self.started_by, self.warm = key, {}, job, False
        return self.home

    def warm_up(self, env: dict) -> None:
        """Before a job's ``flwr run`` (``env``: its environment): if no SuperLink runs yet, start
        one with the warm executor where it applies (:mod:`flmnist.launch.warm_link`)."""
        if self.kept or not warm_link.applies(env) or not warm_link.start(env):
            return
        if not _complete(kept := self._kept()):
            return  # (found at the job's end, as without the warm start)
        self.kept, self.warm = kept, True
        print(f"flmnist: job {self.started_by}: local SuperLink with a warm simulation executor "
              f"(pid {self.kept[WARM][0]}): each job's simulation is a forked child", flush=True)

    def _kept(self) -> dict[str, tuple[int, int | None]]:
        """The SuperLink and executor running under the sweep's FLWR_HOME: role -> (pid, start time)."""
        found = {}
        for pid in pids_with_flwr_home(self.home):
            role = role_of(pid)
            if role is not None and role not in found and not (role == WARM and role_of(parent_of(pid)) == WARM):
                found[role] = (pid, started_at(pid))  # (a forked child of the warm executor runs its program too)
        return found

    def healthy(self) -> bool:
        """Whether the kept SuperLink and SuperExec still run and the SuperLink answers ``/health``."""
        if not _complete(self.kept) or any(started_at(pid) != start for pid, start in self.kept.values()):
            return False
        return warm_link.answers(self.ports[0])

    def end_job(self, grace: float) -> list[int]:
        """Stop the job's processes (``flwr run``, ``flwr-simulation`` and what they started), by
        id; keep the SuperLink and SuperExec if both run. Returns the stopped ids."""
        assert self.home is not None
        found = self._kept()
        if self.warm and found.get(WARM) != self.kept.get(WARM):
            found = {}  # the warm executor died (killed -9, out of memory): what runs its program is an orphaned child
        self.kept = found if _complete(found) else {}  # else: all stopped, the next job starts afresh
        return stop_env(f"FLWR_HOME={self.home}", grace, keep={pid for pid, _ in self.kept.values()})

    def close(self) -> None:
        """Stop every process under the sweep's FLWR_HOME and remove it (again: nothing to do)."""
        if self.home is None:
            return
        with shielded():
            stop_env(f"FLWR_HOME={self.home}")
            shutil.rmtree(self.home, ignore_errors=True)
        self.home, self.kept = None, {}


def _complete(kept: dict) -> bool:
    """A SuperLink and exactly one executor (Flower's SuperExec or the warm one)."""
    return set(kept) in ({SUPERLINK, SUPEREXEC}, {SUPERLINK, WARM})
