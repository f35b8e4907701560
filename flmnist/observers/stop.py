"""``stop_at_target``: end the run at the first evaluated global model at or above the target."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from flmnist.observers.base import Observer


class StopAtTarget(Observer):
    """Wishes the run to stop once the global test accuracy reaches ``target`` (after step 0)."""

    reason = "target accuracy reached"

    def __init__(self, target: float) -> None:
        self.target = target
        self.reached: int | None = None   # the step whose evaluation reached it
        self.accuracy: float | None = None

    def stop_wish(self, step: int, metrics: dict) -> str | None:
        accuracy = metrics.get("test_accuracy")
        if self.reached is None and step > 0 and accuracy is not None and accuracy >= self.target:
            self.reached, self.accuracy = step, accuracy
            log(INFO, "Target accuracy %.2f%% reached at step %d (%.2f%%): stopping (stop_at_target)",
                100 * self.target, step, 100 * accuracy)
        return self.reason if self.reached is not None else None

    def state(self) -> dict | None:
        return {"reached": self.reached, "accuracy": self.accuracy}

    def load_state(self, state: dict) -> None:
        self.reached, self.accuracy = state.get("reached"), state.get("accuracy")
