"""A strategy of one's own, added through config alone (tests/test_extension_strategy.py).

ToyStrategy is Flower's FedAvg with a damped server step: the new global model moves only a
share ``mix`` of the way from the model sent to the nodes' average,

    w_{t+1} = w_t + mix * (w_avg - w_t),

and it counts the updates it has aggregated over the run. What flmnist needs to know about it
is declared here, beside the code: the range of ``mix`` (``parameter_ranges``, checked before
a run starts) and the attribute that must survive a checkpoint and be rolled back with a
rejected aggregate (``checkpoint_state``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from flmnist.strategies.ranges import Range


class ToyStrategy(FedAvg):
    """FedAvg whose server step moves a share ``mix`` of the way to the average."""

    parameter_ranges: ClassVar[dict[str, Range]] = {"mix": Range(0.0, 1.0, low_open=True)}  # (0, 1]
    checkpoint_state = ("updates_seen",)

    def __init__(self, *, mix: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mix = mix
        self.updates_seen = 0  # changes during the run: declared in checkpoint_state
        self.sent: ArrayRecord | None = None  # set again every round: no state to keep

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid
                        ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None or self.sent is None:
            return average, metrics
        self.updates_seen = self.updates_seen + len(replies)  # reassigned, never updated in place
        mixed = {}
        for key, array in average.items():
            old = self.sent[key].numpy()
            mixed[key] = Array(np.asarray(old + self.mix * (array.numpy() - old), dtype=old.dtype))
        return ArrayRecord(mixed), metrics
