"""Peak memory of a run across all its processes: sum of RSS, sampled every 0.2 s.

Counted: this benchmark's own process tree, plus every process whose environment
has the run's FLWR_HOME (the detached SuperLink, SuperExec, ServerApp, Ray workers).
RSS double-counts pages shared between processes, so the sum is an upper bound.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Self

from flmnist.launch.flwr_local import pids_with_flwr_home


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> set[int]:
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += _children(p)
    return seen


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Context manager sampling the summed RSS of the benchmark's processes."""

    def __init__(self, flwr_home: str | None = None, interval: float = 0.2) -> None:
        self.flwr_home, self.interval = flwr_home, interval
        self.peak = 0
        self._stop = threading.Event()

    def sample(self) -> int:
        pids = _tree(os.getpid())
        if self.flwr_home:
            pids |= set(pids_with_flwr_home(self.flwr_home))
        return sum(_rss(p) for p in pids)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.sample())

    def __enter__(self) -> Self:
        self.peak = self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / 2**20
