"""What both engines are, and the pieces they share.

- :class:`Engine`: the interface the run calls (:class:`~flmnist.engine.sync.SyncEngine`,
  :class:`~flmnist.engine.async_loop.AsyncLoop`).
- :func:`restore_common`: the part of a resume both engines do the same way (screen
  counters, hook state, random generators).
- :class:`Liveness`: failures in a row, with the rule of each engine for when they end the
  run: :class:`RoundLiveness` (synchronous rounds) and :class:`UpdateLiveness` (asynchronous
  client updates, with a progress timeout).
- :class:`VirtualClock`: the virtual time of a simulated fleet (:mod:`flmnist.engine.fleet`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from logging import WARNING
from typing import Protocol

from flwr.app import ArrayRecord
from flwr.common.logger import log

from flmnist.core.errors import RunFailed
from flmnist.engine.fleet import Fleet, UpdateTiming
from flmnist.engine.reply_path import ReplyPath
from flmnist.observers.checkpoint import set_rng_state


class Engine(Protocol):
    """A training engine: ``run`` trains from ``initial`` (or resumes from ``checkpoint``) and
    returns the final global model; ``unit`` names its step ("round", "update")."""

    kind: str
    unit: str

    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord: ...

    def state_dict(self) -> dict:
        """The engine's part of a checkpoint (``checkpoint["engine"]``)."""
        ...

    def restore(self, checkpoint: dict) -> None:
        """Take up a run from a checkpoint (as :meth:`ReplyPath.save_checkpoint` wrote it)."""
        ...

    def finish(self) -> None:
        """End of the run (whatever its outcome): the reply path's summary and hooks."""
        ...


def restore_common(path: ReplyPath, checkpoint: dict) -> None:
    """What every engine restores alike: the screen's counters and hook state, then the
    random generators."""
    path.load_state(checkpoint.get("screen", {}))
    set_rng_state(checkpoint["rng"])


# ------------------------------------------------------------------ liveness
STILL = 1e-6  # an update shorter than this (L2) is the model its node was sent (0, or squares underflowing)
NOT_TRAINED = "the model its node was sent (update norm 0): no training"


class Liveness:
    """Failures in a row: :meth:`ok` ends a streak, :meth:`failed` adds to it. A subclass is
    the rule that says when a streak ends the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.last_problem = ""

    def ok(self) -> None:
        self.in_a_row = 0

    def failed(self, problem: str) -> bool:
        """Count one failure; whether the streak has reached the limit."""
        self.in_a_row += 1
        self.last_problem = problem
        return self.in_a_row >= self.limit


class RoundLiveness(Liveness):
    """Synchronous rule: ``max_failed_rounds`` rounds in a row without a new global model end
    the run."""

    advanced_rounds = 0  # rounds of this process that made a new global model
    noised_rounds = 0    # rounds whose model moved by the privacy noise alone

    def count_round(self, step: int, advanced: bool, received: int, rejections: Sequence, moved: bool = False,
                    reason: str | None = None) -> None:
        """A round that made no new global model from an update is failed; too many in a row end
        the run (``moved``: central DP moved the model by its noise alone; ``reason``: why accepted
        updates made none)."""
        if advanced:
            self.advanced_rounds += 1
            self.ok()
            return
        last = reason or (rejections[-1].reason if rejections else "no replies arrived")
        self.noised_rounds += moved
        reached = self.failed(last)
        log(WARNING, "Round %d failed: no usable update (%d replies, %d rejected or failed); "
            "the global model %s (%d/%d failed rounds in a row)", step, received, len(rejections),
            "moved by the privacy noise alone" if moved else "stays as it was", self.in_a_row, self.limit)
        if reached:
            raise RunFailed(f"{self.in_a_row} rounds in a row without a usable update "
                            f"(max_failed_rounds={self.limit}); last reason: {last}")

    def check_some_advanced(self, rounds: int, before: bool) -> None:
        """At the end: a run none of whose ``rounds`` made a new global model (and, ``before``
        False, no earlier part of it either) failed, even with fewer than the limit in a row."""
        if rounds and not before and not self.advanced_rounds:
            model = "the initial one plus the privacy noise" if self.noised_rounds else "the initial one"
            raise RunFailed(f"no round of {rounds} made a usable update: the global model is {model}; "
                            f"last reason: {self.last_problem or 'no replies arrived'}")


class UpdateLiveness(Liveness):
    """Asynchronous rule: ``max_consecutive_failures`` failed, rejected or lost updates in a row
    end the run while every node in flight has failed its last update (one bad node cannot end
    a run others advance); so does no new server version for ``progress_timeout`` seconds. An
    accepted update that is the model its node was sent (norm below ``STILL``) is applied as any
    other, but counts as a failure here: a run of them moves nothing."""

    def __init__(self, limit: int, progress_timeout: float) -> None:
        super().__init__(limit)
        self.progress_timeout = progress_timeout
        self.failing: set[int] = set()   # node ids whose last update failed or was rejected
        self.trained = 0                 # accepted updates of this process that moved the model (norm >= STILL)
        self.last_progress = time.monotonic()

    def update_failed(self, node_id: int, problem: str, in_flight: Iterable[int]) -> None:
        """Count a failed, rejected or timed-out update of ``node_id``; ``in_flight``: the
        node ids still training."""
        self.failing.add(node_id)
        if self.failed(problem) and all(n in self.failing for n in in_flight):
            raise RunFailed(f"{self.in_a_row} client updates in a row failed or were rejected "
                            f"(async_loop.max_consecutive_failures={self.limit}); last: {problem}")

    def passed(self, node_id: int) -> None:
        """``node_id``'s update passed the screen (applied or not)."""
        self.failing.discard(node_id)

    def check_some_advanced(self, version: int, client_updates: int, resumed: bool = False) -> None:
        """At the end: a run still at server version 0 (a resumed one starts at its checkpoint's)
        failed, whatever ended it, as a synchronous run none of whose rounds made a model; so did
        one (not resumed) whose server updates were made of updates of norm 0 alone."""
        if version == 0:
            raise RunFailed(f"no server update in {client_updates} client updates: the global model is the "
                            f"initial one; last reason: {self.last_problem or 'none was applied'}")
        if not resumed and not self.trained:
            raise RunFailed(f"no client update of {client_updates} trained: every accepted update was "
                            f"{NOT_TRAINED}; the global model is the initial one (plus any privacy noise)")

    def progressed(self) -> None:
        """A new server version (or the start of the loop)."""
        self.last_progress = time.monotonic()

    def check_progress(self) -> None:
        waited = time.monotonic() - self.last_progress
        if waited > self.progress_timeout:
            raise RunFailed(f"no new server version for {waited:.0f} s (async_loop.progress_timeout="
                            f"{self.progress_timeout:g}); last problem: {self.last_problem or 'none'}")


# --------------------------------------------------------------------- clock
class VirtualClock:
    """Virtual time in a simulated fleet: each update takes what ``fleet.timing`` says, a
    dropped update holds its slot for ``update_timeout``. The synchronous engine advances it
    by the slowest update of a round, the asynchronous one to each job's completion. Without
    a fleet it stays where it is (``simulated`` is False)."""

    def __init__(self, fleet: Fleet | None, update_timeout: float) -> None:
        self.fleet, self.update_timeout = fleet, update_timeout
        self.now = 0.0
        self.bookkeeping = 0.0   # real seconds spent working out virtual times

    @property
    def simulated(self) -> bool:
        return self.fleet is not None

    def timing(self, partition: int, step: int, examples: int, model_bytes: int) -> UpdateTiming:
        """The fleet's timing of ``partition``'s ``step``-th update (deterministic in the seed)."""
        t = time.perf_counter()
        timing = self.fleet.timing(partition, step, examples, model_bytes)
        self.bookkeeping += time.perf_counter() - t
        return timing

    def cost(self, timing: UpdateTiming) -> float:
        """Virtual seconds an update holds its slot: its duration, the timeout if dropped."""
        return self.update_timeout if timing.dropped else timing.duration

    def advance_by_slowest(self, timings: Iterable[UpdateTiming]) -> None:
        """A round: it lasts as long as its slowest update (no update: no time)."""
        self.now += max([0.0] + [self.cost(t) for t in timings])

    def completion(self, timing: UpdateTiming) -> float:
        """When an update dispatched now completes."""
        return self.now + self.cost(timing)

    def advance_to(self, when: float) -> None:
        self.now = when
