"""The updates the asynchronous loop has folded into its strategy since the last server step.

An update counts as applied, and attribution sees it, when the server step that applies it is
accepted: FedAsync's step is the update itself; FedBuff's is the step its buffer fills to, taken
from the same global model the update was folded into. A rejected step drops its updates (counted
as ``dropped (step rejected)``). Updates still in FedBuff's buffer when a run stops are neither:
they are checkpointed with the buffer, so an extended run applies and attributes them at its
first step, and the loop's statistics list them (``buffered_at_end``).
"""

from __future__ import annotations

from typing import NamedTuple

from flmnist.core.arrays import Weights
from flmnist.core.errors import RunFailed

DROPPED = "dropped (step rejected)"  # the outcome of an update whose server step was rejected


class Folded(NamedTuple):
    """One update in the next server step (``name`` and ``weights`` as a ClientUpdate's)."""

    name: str
    staleness: int
    train_loss: float
    weights: Weights             # the node's model, or its delta where the strategy takes deltas
    reference: Weights | None    # the model it trained on; None for a delta


class PendingStep:
    """Folded updates, until their server step is accepted or rejected."""

    def __init__(self, limit: int = 10) -> None:
        self.folded: list[Folded] = []
        self.limit, self.rejected_in_a_row = limit, 0  # server steps rejected in a row end the run at limit

    def fold(self, update, staleness: int, train_loss: float, reference: Weights, delta: bool) -> None:
        self.folded.append(Folded(update.name, staleness, float(train_loss), update.weights,
                                  None if delta else reference))

    def accepted(self, stats, path, step: int, before: Weights, key: object) -> None:
        """The step to ``step`` was accepted: its updates are applied (counted, attributed on ``before``)."""
        for f in self.folded:
            stats.applied_update(f.name, f.staleness, f.train_loss)
            path.applied(step, before, [f], f.reference, delta=f.reference is None, key=key)
        self.folded, self.rejected_in_a_row = [], 0

    def rejected(self, stats) -> None:
        """The step was rejected: its updates dropped. Steps rejected in a row end the run (each
        reply passed, so the nodes' failure count never grew: it ran until progress_timeout)."""
        for _ in self.folded:
            stats.count(DROPPED)
        self.folded = []
        self.rejected_in_a_row += 1
        if self.rejected_in_a_row >= self.limit:
            raise RunFailed(f"{self.rejected_in_a_row} server steps in a row were rejected as unsound "
                            "(async_loop.max_consecutive_failures); the log names each one's problem")

    def names(self) -> list[str]:
        return [f.name for f in self.folded]

    def state(self) -> list[dict]:
        return [f._asdict() for f in self.folded]

    def load_state(self, state: list[dict] | None) -> None:
        self.folded = [Folded(**f) for f in state or []]
