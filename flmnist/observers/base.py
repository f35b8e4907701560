"""The one interface everything that watches a run implements, and what a run gives it.

An observer is called by the engines (through :class:`~flmnist.engine.reply_path.ReplyPath`) on
the accepted client updates, on each new global model and on the updates applied to it. Each
call may return a dict of metrics for the run's metrics row (or None), and after each evaluated
global model :meth:`Observer.stop_wish` may ask to end the run (both engines stop on it, after
writing their outputs as usual). Observers are listed in the config's ``observers`` section,
each a ``_target_`` called with ``run=`` a :class:`RunContext` (see README, "Adding an
evaluation hook"); adding one needs no edit to flmnist.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunContext:
    """What a run offers its observers when they are built."""

    run_dir: Path
    test_images: Any                 # float tensor [10000, 1, 28, 28], normalised
    test_labels: Any                 # int64 tensor [10000]
    model_fn: Callable[[], Any]      # a fresh model of the run's architecture
    steps: int                       # rounds (sync) or server updates (async) the run is to take
    asynchronous: bool
    printer: Callable[[str], None]   # one line to the run's log
    label: str = ""                  # "NAME: Strategy, split, model, N nodes", for plot titles
    probe: Any = None  # Probes: probe(size, batch_size) is the run's shared Probe of that size


class Observer:
    """Every method is optional; each may return a dict of metrics to record, or None."""

    def evaluate_updates(self, server_round: int, updates: list) -> dict | None:
        """The screened client updates of a step (:class:`~flmnist.protocol.screen.ClientUpdate`), before aggregation."""
        return None

    def evaluate_global(self, server_round: int, arrays) -> dict | None:
        """The global model (an ``ArrayRecord``) after each round or evaluation point, and step 0."""
        return None

    def updates_applied(self, step: int, before: dict, deltas: Sequence[tuple[str, dict]],
                        key: object = None) -> dict | None:
        """The updates the server applies to the global model ``before`` (weights): (node name,
        delta) pairs, each delta what the node's training changed."""
        return None

    def stopping(self, step: int) -> None:
        """The engine ends the run after ``step`` (the privacy budget), before its global model is seen."""

    def stop_wish(self, step: int, metrics: dict) -> str | None:
        """After an evaluated global model (``metrics``: its row so far): a reason to end the run now, or None."""
        return None

    def skips(self, step: int) -> bool:
        """Whether the observer leaves the global model of ``step`` unevaluated (the global evaluation's
        schedule, ``eval.rounds``): no stop wish is asked at such a step (the run would report an
        earlier model's accuracy as its final one)."""
        return False

    def finish(self, wall_time: float | None = None) -> dict | None:
        """Once at the end of the run; a dict goes into the run's summary under the class's name."""
        return None

    def state(self) -> dict | None:
        """What a checkpoint keeps of the observer (None: nothing)."""
        return None

    def load_state(self, state: dict) -> None:
        """Restore what :meth:`state` returned."""


def observer_keys(observers: Iterable[Observer]) -> list[str]:
    """A key per observer, in order, for its checkpoint state and its ``summary.json`` section: its
    class name; a second (third, ...) observer of the same class gets ``_2`` (``_3``, ...), so
    two of one class (``+observers.NAME._target_=...``) never overwrite each other's."""
    seen: Counter = Counter()
    keys = []
    for observer in observers:
        name = type(observer).__name__
        seen[name] += 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys
