"""``Guarded``: any Flower strategy, with flmnist's guarantees around it.

Like Flower's own DP wrappers (``DifferentialPrivacyServerSideFixedClipping``), it takes an
inner strategy and adds its steps around the inner's ``configure_*``/``aggregate_*`` calls,
so every strategy in ``flwr.serverapp.strategy`` (FedAvg, FedProx, FedAvgM, FedAdam,
FedAdagrad, FedYogi, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, ...) can be named in
``conf/strategy/`` directly. Around the inner strategy it:

- screens every reply through the run's :class:`~flmnist.engine.reply_path.ReplyPath` and hands the
  inner strategy only accepted updates, rebuilt from their checked arrays and metrics, in a
  fixed order (by partition), so the average is reproducible and no reply can crash Flower's
  aggregation;
- checks the aggregate: a non-finite one never becomes the global model (the inner
  strategy's state is rolled back with it);
- counts rounds without a usable update and fails the run after ``max_failed_rounds`` in a row;
- advances the virtual clock of a simulated fleet (a round lasts as long as its slowest node);
- holds the checkpoint state (the inner strategy's momentum and optimiser buffers).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from flmnist.core.arrays import to_record, to_weights
from flmnist.core.errors import RunFailed
from flmnist.engine.fleet import Fleet
from flmnist.engine.reply_path import ReplyPath
from flmnist.protocol import messages as p
from flmnist.protocol.aggregation import aggregate_train_metrics

# Attributes of Flower's strategies that change during a run (FedAvgM, FedOpt family).
INNER_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t")


def _plain(value):
    """ArrayRecords become dicts of numpy arrays, so a checkpoint holds no Flower objects."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": to_weights(value)}
    return value


def _finite_state(strategy: Strategy) -> bool:
    """Whether every array of the inner strategy's state is finite (FedAdam's second moment can
    overflow to inf on a finite but huge update while its aggregate stays finite)."""
    for key in INNER_STATE:
        value = _plain(getattr(strategy, key, None))
        if isinstance(value, dict):
            value = list(value.get("__arrayrecord__", value).values())
        if isinstance(value, list) and not all(np.isfinite(np.asarray(v)).all() for v in value):
            return False
    return True


def _restore(value):
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return to_record(value["__arrayrecord__"])
    return value


class Guarded(Strategy):
    """A Flower strategy whose every reply passes the screen (see the module docstring)."""

    def __init__(
        self,
        strategy: Strategy,
        path: ReplyPath,
        fleet: Fleet | None = None,
        virtual_timeout: float = 600.0,
        max_failed_rounds: int = 3,
    ) -> None:
        self.strategy = strategy
        # Loss traces are lists of different lengths: Flower's default metric average cannot take them.
        strategy.train_metrics_aggr_fn = aggregate_train_metrics
        self.path, self.fleet, self.virtual_timeout = path, fleet, virtual_timeout
        self.max_failed_rounds = max_failed_rounds
        self.reference: dict | None = None  # the global weights sent this round
        self.round_offset = 0               # rounds done before a resume
        self.failed_rounds = 0              # rounds in a row without a new global model
        self.virtual_time = 0.0
        self.client_updates = 0

    @property
    def name(self) -> str:
        return type(self.strategy).__name__

    def summary(self) -> None:
        self.strategy.summary()

    # ----------------------------------------------------------- configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self.reference = to_weights(arrays)
        return self.strategy.configure_train(server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        return self.strategy.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    # ----------------------------------------------------------- aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        step = server_round + self.round_offset
        replies = list(replies)
        self.client_updates += len(replies)
        updates, rejections = self.path.train_replies(step, replies, self.reference)
        updates.sort(key=lambda u: (u.partition, u.name))  # a fixed order: a reproducible sum
        if self.fleet is not None:
            updates = self.advance_clock(step, updates)
            self.path.record(step, virtual_time=round(self.virtual_time, 4))
        arrays, metrics = None, None
        if updates:
            # Flower's strategies assign new objects to these attributes (never update them in
            # place), so keeping references is enough to roll them back.
            snapshot = {k: getattr(self.strategy, k) for k in INNER_STATE if hasattr(self.strategy, k)}
            try:
                arrays, metrics = self.strategy.aggregate_train(
                    step, [Message(content=u.content(), metadata=u.metadata) for u in updates])
            except Exception as err:  # noqa: BLE001 - the inner strategy's failure fails this round only
                log(WARNING, "%s could not aggregate round %d: %s: %s", self.name, step, type(err).__name__, err)
            weights = self.path.aggregate(arrays, self.reference) if arrays is not None else None
            if weights is not None and not _finite_state(self.strategy):
                self.path.aggregates_rejected += 1
                log(WARNING, "Aggregate rejected (%s's state holds non-finite values); the global model "
                    "stays as it was", self.name)
                weights = None
            if weights is None:
                for k, v in snapshot.items():  # roll the inner strategy back with the model
                    setattr(self.strategy, k, v)
                arrays = None
            else:
                arrays = to_record(weights)
                self.path.applied(step, self.reference, updates, self.reference, delta=False, key=("round", step))
        self.path.record(
            step,
            client_updates=self.client_updates,
            train_loss=None if metrics is None else metrics.get(p.TRAIN_LOSS),
            num_updates=len(updates),
            rejected_updates=sum(not r.failed for r in rejections),
            failed_replies=sum(r.failed for r in rejections),
            rejections=[f"{r.name}: {r.reason}" for r in rejections if not r.failed],
            train_examples=sum(u.num_examples for u in updates),
        )
        self.count_round(step, arrays is not None, len(replies), rejections)
        return arrays, metrics

    def count_round(self, step: int, advanced: bool, received: int, rejections) -> None:
        """A round that made no new global model is failed; too many in a row end the run."""
        if advanced:
            self.failed_rounds = 0
            return
        self.failed_rounds += 1
        log(WARNING, "Round %d failed: no usable update (%d replies, %d rejected or failed); "
            "the global model stays as it was (%d/%d failed rounds in a row)",
            step, received, len(rejections), self.failed_rounds, self.max_failed_rounds)
        if self.failed_rounds >= self.max_failed_rounds:
            last = rejections[-1].reason if rejections else "no replies arrived"
            raise RunFailed(f"{self.failed_rounds} rounds in a row without a usable update "
                            f"(max_failed_rounds={self.max_failed_rounds}); last reason: {last}")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        step = server_round + self.round_offset
        metrics, _ = self.path.evaluate_replies(replies)
        if metrics is not None:
            fields = {"client_loss": metrics.get("loss"), "client_accuracy": metrics.get("accuracy")}
            fields.update({f"client_acc_digit_{d}": metrics.get(f"accuracy-{d}") for d in range(p.NUM_CLASSES)})
            self.path.record(step, **fields)
        return metrics

    # --------------------------------------------------------------- clock
    def advance_clock(self, step: int, updates: list) -> list:
        """Advance virtual time by the slowest node's update (a dropped update costs the
        timeout) and drop the updates whose device dropped out."""
        model_bytes = sum(v.nbytes for v in self.reference.values())
        durations, arrived = [0.0], []
        for u in updates:
            timing = self.fleet.timing(u.partition, step, u.metrics[p.EXAMPLES_PROCESSED], model_bytes)
            durations.append(self.virtual_timeout if timing.dropped else timing.duration)
            if not timing.dropped:
                arrived.append(u)
        self.virtual_time += max(durations)
        return arrived

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        inner = {k: _plain(getattr(self.strategy, k)) for k in INNER_STATE if hasattr(self.strategy, k)}
        return {"inner": inner, "virtual_time": self.virtual_time, "client_updates": self.client_updates,
                "failed_rounds": self.failed_rounds}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["inner"].items():
            setattr(self.strategy, k, _restore(v))
        self.virtual_time, self.client_updates = state["virtual_time"], state["client_updates"]
        self.failed_rounds = state["failed_rounds"]
