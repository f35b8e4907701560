"""The synchronous engine: Flower's own round loop (``Strategy.start``) on a guarded strategy.

Each round the guarded strategy (:class:`~flmnist.strategies.guard.Guarded`) samples nodes,
screens their replies and aggregates the accepted ones; after each round the run's
:class:`~flmnist.reply_path.ReplyPath` evaluates the global model, records the round and
checkpoints. ``run(initial, checkpoint)`` is the same call as the asynchronous engine's.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, MetricRecord

from flmnist.checkpoint import set_rng_state
from flmnist.reply_path import ReplyPath, to_weights
from flmnist.strategies.guard import Guarded


class FinalResultsFilter(logging.Filter):
    """Drops the "Final results:" dump Flower's round loop logs at its end (every metric of every
    round in scientific notation, after flmnist's own summary table and files)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropping = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.strip() == "Final results:":
            self.dropping = True
        elif self.dropping and message.strip() and not message.startswith("\t"):
            self.dropping = False  # the dump is blank and tab-indented lines
        return not self.dropping

    def __enter__(self):
        logging.getLogger("flwr").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("flwr").removeFilter(self)


class TargetReached(Exception):
    """Raised from the evaluation function to end Flower's round loop (``stop_at_target``)."""


class SyncEngine:
    """Run ``num_rounds`` rounds of a guarded Flower strategy."""

    kind = "sync"
    unit = "round"

    def __init__(self, grid, strategy: Guarded, path: ReplyPath, train_config, num_rounds: int,
                 round_timeout: float = 3600.0) -> None:
        self.grid, self.strategy, self.path = grid, strategy, path
        self.train_config, self.num_rounds, self.round_timeout = train_config, num_rounds, round_timeout
        self.arrays: ArrayRecord | None = None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each round (and round 0): hooks, metrics row, checkpoint; Flower logs the headline."""
        if server_round == 0 and self.strategy.round_offset:
            return None  # resumed: the initial model was evaluated in the first run
        step = server_round + self.strategy.round_offset
        self.arrays = arrays
        fields = self.path.global_model(step, arrays)
        if step > 0 and self.path.checkpoint_due(step):
            self.path.save_checkpoint(self.kind, step, to_weights(arrays), self.strategy.state_dict())
        if self.path.target_reached is not None:
            raise TargetReached(step)  # stop_at_target: out of Flower's round loop, outputs as usual
        headline = {k: fields[k] for k in ("test_loss", "test_accuracy") if fields.get(k) is not None}
        return MetricRecord(headline) if headline else None

    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord:
        done = 0
        self.arrays = initial
        if checkpoint is not None:
            self.strategy.load_state_dict(checkpoint["engine"])
            self.path.load_state(checkpoint.get("screen", {}))
            set_rng_state(checkpoint["rng"])
            done = self.strategy.round_offset = int(checkpoint["round"])
        if self.num_rounds > done:
            try:
                with FinalResultsFilter():
                    self.strategy.start(
                        grid=self.grid, initial_arrays=initial, num_rounds=self.num_rounds - done,
                        timeout=self.round_timeout, train_config=self.train_config,
                        evaluate_config=self.train_config, evaluate_fn=self.evaluate,
                    )
            except TargetReached:
                pass  # Flower 1.41's loop has no early stop: the evaluation function ends it
        return self.arrays
