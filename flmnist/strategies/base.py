"""What every flmnist strategy adds to Flower's: reply validation, evaluation hooks, recording.

:class:`FlmnistStrategy` is a mixin placed before a Flower strategy class
(``class FedProx(FlmnistStrategy, flwr...FedProx)``). It filters each round's
replies through :func:`reply_problem` before Flower aggregates them, calls the
evaluation hooks on client updates and on the global model, and hands all
metrics to the run recorder. Flower's own round loop (``start``) is reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log

from flmnist.aggregation import aggregate_evaluate_counts, aggregate_train_metrics
from flmnist.checkpoint import rng_state, save_checkpoint, strategy_state
from flmnist.evaluation import ClientUpdate, EvaluationHook
from flmnist.fleet import Fleet
from flmnist.recorder import RunRecorder
from flmnist.strategies.validation import reply_problem


def node_name(msg: Message) -> str:
    """The node's name from its reply (``node-info``: ``node <partition-id>`` in simulation, the
    ``node-name`` of a device), else ``node <partition-id>``, else ``node <Flower node id>``."""
    if msg.has_error():  # an error reply has no content
        return f"node {msg.metadata.src_node_id}"
    info = msg.content.config_records.get("node-info")
    if info is not None and info.get("node-name"):
        return str(info["node-name"])
    try:
        metrics = next(iter(msg.content.metric_records.values()))
        return f"node {int(metrics['partition-id'])}"
    except (StopIteration, KeyError, TypeError, ValueError):
        return f"node {msg.metadata.src_node_id}"


def scalar_metrics(record: MetricRecord | dict | None) -> dict:
    return {k: v for k, v in (record or {}).items() if isinstance(v, (int, float))}


class FlmnistStrategy:
    """Mixin for a Flower strategy: validation, evaluation hooks and run recording."""

    def __init__(
        self,
        *,
        hooks: Sequence[EvaluationHook] = (),
        recorder: RunRecorder | None = None,
        train_metrics_aggr_fn: Callable | None = None,
        evaluate_metrics_aggr_fn: Callable | None = None,
        fleet: Fleet | None = None,
        virtual_timeout: float = 600.0,
        checkpoint_every: int = 0,
        **strategy_kwargs,
    ) -> None:
        super().__init__(
            train_metrics_aggr_fn=train_metrics_aggr_fn or aggregate_train_metrics,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn or aggregate_evaluate_counts,
            **strategy_kwargs,
        )
        self.hooks = list(hooks)
        self.recorder = recorder
        self.global_arrays: ArrayRecord | None = None
        self.fleet, self.virtual_timeout = fleet, virtual_timeout
        self.virtual_time = 0.0
        self.client_updates = 0
        self.checkpoint_every = checkpoint_every  # rounds between checkpoints (0: none)
        self.round_offset = 0  # rounds already done before a resume

    def _record(self, server_round: int, **fields) -> None:
        if self.recorder is not None:
            self.recorder.add(server_round, **fields)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        self.global_arrays = arrays
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def screen_replies(self, replies: Iterable[Message], check_arrays: bool = True):
        """Split replies into (kept, number rejected); error replies are kept for Flower to log."""
        kept, rejected = [], 0
        for msg in replies:
            if msg.has_error():
                kept.append(msg)
                continue
            problem = reply_problem(
                msg.content, self.global_arrays if check_arrays else None,
                self.arrayrecord_key, self.weighted_by_key, check_arrays,
            )
            if problem:
                rejected += 1
                log(WARNING, "Rejected update from %s (node id %s): %s",
                    node_name(msg), msg.metadata.src_node_id, problem)
            else:
                kept.append(msg)
        return kept, rejected

    def on_virtual_clock(self, server_round: int, replies: list[Message]) -> list[Message]:
        """With a simulated fleet: advance virtual time by the slowest node's update (a
        dropped update costs the timeout) and drop the replies whose device dropped out."""
        durations, arrived = [0.0], []
        model_bytes = sum(a.numpy().nbytes for a in self.global_arrays.values()) if self.global_arrays else 0
        for msg in replies:
            try:
                metrics = next(iter(msg.content.metric_records.values()))
                node, examples = int(metrics["partition-id"]), int(metrics["examples-processed"])
            except (StopIteration, KeyError, TypeError, ValueError):
                arrived.append(msg)  # errors and malformed replies are handled by screening
                continue
            timing = self.fleet.timing(node, server_round, examples, model_bytes)
            durations.append(self.virtual_timeout if timing.dropped else timing.duration)
            if not timing.dropped:
                arrived.append(msg)
        self.virtual_time += max(durations)
        return arrived

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        # A fixed order (by node name) makes the average's floating-point sum reproducible.
        replies = sorted(replies, key=lambda m: (m.has_error(), node_name(m) if not m.has_error() else ""))
        self.client_updates += len(replies)
        if self.fleet is not None:
            replies = self.on_virtual_clock(server_round, replies)
            self._record(server_round, virtual_time=round(self.virtual_time, 4))
        self._record(server_round, client_updates=self.client_updates)
        kept, rejected = self.screen_replies(replies)
        updates = [
            ClientUpdate(
                node_id=msg.metadata.src_node_id,
                name=node_name(msg),
                arrays=msg.content[self.arrayrecord_key],
                metrics=next(iter(msg.content.metric_records.values())),
            )
            for msg in kept
            if not msg.has_error()
        ]
        for hook in self.hooks:
            self._record(server_round, **(hook.evaluate_updates(server_round, updates) or {}))
        if self.recorder is not None:
            for u in updates:
                self.recorder.add_loss_trace(u.name, list(u.metrics.get("loss-trace", [])))
        arrays, metrics = super().aggregate_train(server_round, kept)
        self._record(
            server_round,
            train_loss=(metrics or {}).get("train-loss"),
            num_updates=len(updates),
            rejected_updates=rejected,
            failed_replies=sum(1 for m in replies if m.has_error()),
            train_examples=sum(int(u.metrics["num-examples"]) for u in updates),
        )
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        kept, _ = self.screen_replies(list(replies), check_arrays=False)
        metrics = super().aggregate_evaluate(server_round, kept)
        if metrics is not None:
            fields = {"client_loss": metrics.get("loss"), "client_accuracy": metrics.get("accuracy")}
            fields.update({f"client_acc_digit_{d}": metrics.get(f"accuracy-{d}") for d in range(10)})
            self._record(server_round, **fields)
        return metrics

    def start(self, grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config=None, evaluate_config=None, evaluate_fn=None):
        """Flower's round loop, with the hooks and the recorder run after every round."""

        def evaluate_with_hooks(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0 and self.round_offset:
                return None  # resumed: the initial model was evaluated in the first run
            server_round += self.round_offset
            fields = scalar_metrics(evaluate_fn(server_round, arrays) if evaluate_fn else None)
            for hook in self.hooks:
                fields.update(hook.evaluate_global(server_round, arrays) or {})
            if self.recorder is not None:
                self._record(server_round, **fields)
                self.recorder.end_round(server_round, arrays.to_torch_state_dict())
                if self.checkpoint_every and server_round % self.checkpoint_every == 0:
                    self.save_checkpoint(server_round, arrays)
            # Flower logs and keeps this record: the headline numbers; the rest is in the run directory.
            headline = {k: fields[k] for k in ("test_loss", "test_accuracy") if fields.get(k) is not None}
            return MetricRecord(headline) if headline else None

        return super().start(
            grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds, timeout=timeout,
            train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_with_hooks,
        )

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """Everything needed to continue after ``server_round``, written atomically."""
        save_checkpoint(self.recorder.run_dir, {
            "kind": "sync",
            "round": server_round,
            "arrays": {k: v.numpy() for k, v in arrays.items()},
            "strategy": strategy_state(self),
            "recorder": self.recorder.state(),
            "rng": rng_state(),
        })
