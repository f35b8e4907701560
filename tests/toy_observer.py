"""A toy observer added through config alone (tests/test_extension_observer.py): it counts the
global models it sees, records one metric, and asks the run to stop after ``stop_after`` steps."""

from __future__ import annotations

from flmnist.observers.base import Observer, RunContext


class CountingObserver(Observer):
    def __init__(self, run: RunContext, stop_after: int = 0) -> None:
        self.run_dir, self.stop_after = run.run_dir, stop_after
        self.seen: list[int] = []

    def evaluate_global(self, server_round, arrays):
        self.seen.append(server_round)
        return {"toy_models_seen": len(self.seen)}

    def stop_wish(self, step, metrics):
        return "the toy observer has seen enough" if self.stop_after and step >= self.stop_after else None

    def finish(self, wall_time=None):
        return {"models_seen": len(self.seen)}
