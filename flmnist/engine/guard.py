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
- counts rounds without a usable update and fails the run after ``max_failed_rounds`` in a row
  (:class:`~flmnist.engine.base.RoundLiveness`);
- advances the virtual clock of a simulated fleet (:class:`~flmnist.engine.base.VirtualClock`:
  a round lasts as long as its slowest node);
- holds the checkpoint state (the inner strategy's momentum and optimiser buffers, as
  :func:`~flmnist.strategies.state.checkpoint_state` names them);
- under ``privacy=central`` or ``client`` (:mod:`flmnist.engine.privacy`), the inner strategy is
  Flower's DP wrapper: every round hands it exactly the sampled number of updates (a rejected or
  missing one as a zero update), records epsilon, and asks the run to stop before a round that
  would spend more than ``privacy.max_epsilon``; under ``local`` or ``dpsgd`` each task sent
  counts for its node (:meth:`Guarded.account`);
- with ``evaluate_in_train`` (``sampling.client_evaluation=in_train``), one exchange per round:
  each train message asks its node to evaluate the model it receives before training, and the
  replies' evaluations are the client metrics of the previous round's model (the same model an
  evaluate exchange would have sent then); only the last round still has an evaluate exchange.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from flmnist.core.arrays import to_record, to_weights
from flmnist.engine.base import NOT_TRAINED, STILL, RoundLiveness, VirtualClock
from flmnist.engine.fleet import Fleet, UpdateTiming
from flmnist.engine.privacy import Accountant
from flmnist.engine.privacy_ledger import restore_ledger, save_ledger
from flmnist.engine.reply_path import ReplyPath
from flmnist.engine.sent_tasks import SentTasks
from flmnist.protocol import messages as p
from flmnist.protocol.aggregation import aggregate_train_metrics
from flmnist.strategies.state import checkpoint_state


def _plain(value):
    """ArrayRecords become dicts of numpy arrays, so a checkpoint holds no Flower objects."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": to_weights(value)}
    return value


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
        privacy: Accountant | None = None,
        per_round: int = 0,
        evaluate_in_train: bool = False,
    ) -> None:
        self.strategy = strategy
        self.evaluate_in_train = evaluate_in_train
        self.last_round: int | None = None  # set by the engine: the run's last round (its evaluate exchange)
        self.exchanged: int | None = None   # the last step whose model had its evaluate exchange
        self.sampling_rng = None            # the engine's seeded sampling generator (SyncEngine sets it)
        self.rng_before_exchange = None     # its state before the run's last exchange (evaluate_in_train)
        self.privacy, self.per_round = privacy, per_round  # privacy=central: the accountant, nodes a round
        # Loss traces are lists of different lengths: Flower's default metric average cannot take them.
        self.central = privacy is not None and privacy.central  # Flower's DP wrapper around the strategy
        # DP-SGD, local DP: the tasks sent, counted as they go out
        self.tasks = SentTasks(privacy, path.identities) if privacy is not None and not self.central else None
        self.sent: dict[str, list[Message]] = {}  # "train" / "evaluate": the messages of the exchange (sent_to)
        (strategy.strategy if self.central else strategy).train_metrics_aggr_fn = aggregate_train_metrics
        self.path = path
        self.liveness = RoundLiveness(max_failed_rounds)  # rounds in a row without a new global model
        self.clock = VirtualClock(fleet, virtual_timeout)
        self.reference: dict | None = None  # the global weights sent this round
        self.round_offset = 0               # rounds done before a resume
        self.client_updates = 0
        self.registered: dict[int, int] = {}  # simulation: node id -> its partition, by registration order

    @property
    def failed_rounds(self) -> int:
        """Rounds in a row without a new global model."""
        return self.liveness.in_a_row

    @property
    def virtual_time(self) -> float:
        return self.clock.now

    @property
    def name(self) -> str:
        if self.central:
            how = {"client": "client-side clipping", "central_adaptive": "central DP, adaptive clipping"}.get(
                self.privacy.settings.mechanism, "central DP")
            return f"{type(self.strategy.strategy).__name__} with {how}"
        return type(self.strategy).__name__ + (f" with {self.privacy.label}" if self.privacy is not None else "")

    def summary(self) -> None:
        self.strategy.summary()

    # ----------------------------------------------------------- configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self.reference = to_weights(arrays)
        if self.clock.simulated:  # node id -> partition by registration (see advance_clock)
            self.registered = {node_id: i for i, node_id in enumerate(grid.get_node_ids())}
        if self.central and not self.privacy.flower_composes:  # central_adaptive: the clip this round uses
            self.privacy.clips.append(self.privacy.clip)
        if self.central:
            self.sample_exactly(grid)
        messages = self.sent["train"] = list(self.strategy.configure_train(server_round + self.round_offset, arrays,
                                                                           config, grid))
        if self.tasks is not None:  # DP-SGD, local DP: every task sent counts
            self.tasks.sent([m.metadata.dst_node_id for m in messages], self.path.recorder, list(grid.get_node_ids()))
        return messages

    def sample_exactly(self, grid) -> None:
        """Central DP: Flower's wrapper takes exactly ``per_round`` nodes a round, while its inner
        strategy samples a fraction of the nodes connected now; a spare board, or one re-registered
        under a new node id before the old one is dropped, made that more and ended the run. The
        fraction is set so that it samples ``per_round`` of whatever is connected (waiting, as Flower
        does, while fewer are)."""
        connected = len(list(grid.get_node_ids()))
        self.strategy.strategy.fraction_train = (self.per_round + 0.5) / max(connected, 1)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid):
        step = server_round + self.round_offset
        if self.evaluate_in_train and self.last_round is not None and step < self.last_round \
                and self.path.stop_wish is None:  # (a run ending here, the privacy budget: no next round)
            return []  # the next round's train replies evaluate this model
        if self.evaluate_in_train and self.sampling_rng is not None:  # the run's last exchange, which a
            self.rng_before_exchange = self.sampling_rng.getstate()  # longer run does not make: not checkpointed
        self.exchanged = step
        self.sent["evaluate"] = list(self.strategy.configure_evaluate(step, arrays, config, grid))
        return self.sent["evaluate"]

    def sent_to(self, exchange: str) -> dict[str, int]:
        """Message id -> node id of the exchange's messages (ids set as Flower pushed them): a reply
        Flower's SuperLink wrote for one of them is counted under its node (IdentityBook.failure_of)."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent.get(exchange, ())}

    def evaluate_stopped(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid,
                         timeout: float) -> None:
        """The run stops after this round on what its global evaluation found (``stop_at_target``):
        the evaluate exchange that ``configure_evaluate`` left to the next round's train replies."""
        step = server_round + self.round_offset
        if self.evaluate_in_train and self.exchanged != step:
            replies = grid.send_and_receive(self.configure_evaluate(server_round, arrays, config, grid), timeout=timeout)
            self.aggregate_evaluate(server_round, replies)

    # ----------------------------------------------------------- aggregate
    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        step = server_round + self.round_offset
        replies = list(replies)
        self.client_updates += len(replies)
        lost = self.lost_in_fleet(step, replies) if self.clock.simulated else []
        replies = [m for m in replies if all(m is not gone for gone, _ in lost)]
        updates, rejections = self.path.train_replies(step, replies, self.reference, sent_to=self.sent_to("train"))
        if self.evaluate_in_train:  # the model sent: the last round's global model
            self._record_client_evaluation(step - 1, self.path.received_evaluation())
        if self.clock.simulated:
            self.advance_clock(step, updates, rejections, [timing for _, timing in lost])
            self.path.record(step, virtual_time=round(self.clock.now, 4))
        arrays, metrics, why = None, None, None
        if updates or self.central:  # central DP: a round nobody's update reached is noise alone
            # Flower's strategies assign new objects to these attributes (never update them in
            # place), so keeping references is enough to roll them back.
            snapshot = {k: getattr(self.strategy, k) for k in checkpoint_state(self.strategy)}
            messages = [Message(content=u.content(), metadata=u.metadata) for u in updates]
            if self.central:
                messages = self.zero_updates(messages, [u.norm for u in updates])
            try:
                arrays, metrics = self.strategy.aggregate_train(step, messages)
                if self.central and metrics is not None:  # the real replies' metrics only
                    metrics = aggregate_train_metrics([u.content() for u in updates], p.UNIT_WEIGHT) if updates else None
            except Exception as err:  # noqa: BLE001 - the inner strategy's failure fails this round only
                log(WARNING, "%s could not aggregate round %d: %s: %s", self.name, step, type(err).__name__, err)
                why = f"{self.name} could not aggregate the accepted updates ({type(err).__name__}: {err})"
            weights = None if arrays is None else self.path.aggregate(arrays, self.reference, self._inner_state())
            if arrays is not None and weights is None:
                why = f"the aggregate of the accepted updates was rejected ({self.path.last_aggregate_problem})"
            if weights is None:
                for k, v in snapshot.items():  # roll the inner strategy back with the model
                    setattr(self.strategy, k, v)
                arrays = None
            else:
                arrays = to_record(weights)
                self.path.applied(step, self.reference, updates, self.reference, delta=False, key=("round", step))
        if self.privacy is not None:
            self.account(step, arrays is not None, handed=bool(updates) or self.central)
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
        # An update of norm 0 is the model its node was sent: a round made of such updates moved
        # nothing, and a run made of such rounds (every node returning what it got) failed.
        trained = any(u.norm >= STILL for u in updates)
        if updates and not trained and why is None:
            why = f"every accepted update is {NOT_TRAINED}"
        self.liveness.count_round(step, arrays is not None and trained, len(replies), rejections,
                                  moved=arrays is not None and self.central, reason=why)
        return arrays, metrics

    # ------------------------------------------------------------- privacy
    def zero_updates(self, messages: list[Message], norms: list[float]) -> list[Message]:
        """Exactly ``per_round`` updates for the DP average: each rejected or missing one is the
        global model itself (a zero update), so one node's absence changes the mean by at most
        the clip over n, as the accountant assumes; a round with no update at all is all zero
        updates, so its model is the last one plus the noise (released unchanged, it would tell a
        round whose sampled nodes all failed from one whose update arrived). (Flower 1.41's clip
        divides by the update's norm, so the pad moves one coordinate by one float step:
        :func:`nearly_zero`; so does an accepted update of norm 0, the model the node was sent: a node
        with nothing to train on, or a hostile one, failed the round.)"""
        zero = to_record(nearly_zero(self.reference))
        for m, norm in zip(messages, norms, strict=True):
            if norm < STILL:
                m.content[p.ARRAYS] = zero
        if len(messages) >= self.per_round:
            return messages[: self.per_round]
        # the real updates' metric keys (Flower wants the same in every reply); their values are not used
        keys = dict(messages[0].content[p.METRICS].items()) if messages else {p.UNIT_WEIGHT: 1}
        pad = [Message(RecordDict({p.ARRAYS: zero, p.METRICS: MetricRecord(keys)}), dst_node_id=0,
                       message_type=MessageType.TRAIN) for _ in range(self.per_round - len(messages))]
        log(WARNING, "Privacy: %d of %d updates missing or rejected this round; each counts as a zero update%s",
            len(pad), self.per_round, "" if messages else " (the model moves by the noise alone)")
        return messages + pad

    def account(self, step: int, released: bool, handed: bool = True) -> None:
        """Epsilon into the round's row; a stop before the next round if it would exceed the budget.
        DP-SGD, local DP: the round's tasks counted when sent (:mod:`flmnist.engine.sent_tasks`) move
        to the partitions of the node ids bound since.
        ``central_adaptive``: flmnist composes the round itself when updates were ``handed`` to the
        wrapper (its noised count was released even if the aggregate is then rejected and the clip
        rolled back)."""
        if self.central and not self.privacy.flower_composes:
            self.path.record(step, clipping_norm=round(self.privacy.clips[-1], 6) if self.privacy.clips else None)
            if handed:
                self.privacy.compose(self.per_round)
                released = True
        if self.tasks is not None:
            self.tasks.attribute(warn=True)
        if released or not self.central:  # DP-SGD: the nodes spent it whether or not the round aggregated
            self.privacy.log_release(step, "round")
        epsilon = self.privacy.epsilon
        self.path.record(step, epsilon=round(epsilon, 6))
        self.path.report("privacy", self.privacy.summary())
        save_ledger(self.path.recorder, self.privacy, epsilon)
        if self.last_round is None or step < self.last_round:
            self.check_budget(step)

    def check_budget(self, step: int) -> None:
        """A stop after ``step`` if the next round would exceed the privacy budget (each round's end;
        and before a resumed run's first round, which nothing checked: it spent past the budget)."""
        if self.privacy is not None and (self.tasks.would_exceed() if self.tasks is not None
                                         else self.privacy.would_exceed(self.per_round)):
            self.path.request_stop(step, "privacy budget", epsilon=round(self.privacy.epsilon, 6),
                                   max_epsilon=self.privacy.settings.max_epsilon)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        step = server_round + self.round_offset
        metrics, _ = self.path.evaluate_replies(replies, self.sent_to("evaluate"))
        self._record_client_evaluation(step, metrics)
        return metrics

    def _record_client_evaluation(self, step: int, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            fields = {"client_loss": metrics.get("loss"), "client_accuracy": metrics.get("accuracy")}
            fields.update({f"client_acc_digit_{d}": metrics.get(f"accuracy-{d}") for d in range(p.NUM_CLASSES)})
            self.path.record(step, **fields)

    # --------------------------------------------------------------- clock
    def node_partition(self, node_id: int) -> int | None:
        """A node id's partition: its bound identity's, else its place in the registration order
        (the simulation registers partition i i-th); never what a reply claims."""
        bound = self.path.identities.bound.get(node_id)
        return bound.partition if bound is not None else self.registered.get(node_id)

    def _partition_of(self, update) -> int:
        """The device an accepted update ran on: its node id's (as for the drop), else what it claims."""
        known = self.node_partition(update.node_id)
        return update.partition if known is None else known

    def lost_in_fleet(self, step: int, replies: list[Message]) -> list[tuple[Message, UpdateTiming]]:
        """The replies whose simulated device dropped out this round, with their timings: they
        never arrived, so the server reads nothing of them (no screen, no loss trace, no hook, no
        length window, no guard), like the asynchronous loop. The drop depends only on the
        node's partition and the round, not on the reply."""
        model_bytes = sum(v.nbytes for v in self.reference.values())
        lost = []
        for msg in replies:
            partition = self.node_partition(msg.metadata.src_node_id)
            if partition is None or self.path.screen.limits is None:
                continue
            timing = self.clock.timing(partition, step, self.path.work(partition, self.path.screen.limits.train_cap(partition)), model_bytes)
            if timing.dropped:
                lost.append((msg, timing))
        if lost:
            log(INFO, "Round %d: %d update(s) lost to the simulated fleet's dropout", step, len(lost))
        return lost

    def advance_clock(self, step: int, updates: list, rejections: list = (), lost: list = ()) -> None:
        """Advance virtual time by the slowest node's update; a dropped update (``lost``, its
        timing) costs the timeout. A rejected or failed reply took its node's time too (the round
        waited for it; the asynchronous loop charges it as well), with the work sent to it."""
        model_bytes = sum(v.nbytes for v in self.reference.values())
        parts = [self._partition_of(u) for u in updates]  # timed by the server's partition sizes, not the claims
        timings = [self.clock.timing(part, step, self.path.work(part, u.metrics[p.NUM_EXAMPLES]), model_bytes)
                   for part, u in zip(parts, updates)]
        waited = []
        for r in rejections:
            partition = self.node_partition(r.node_id)
            if partition is not None and self.path.screen.limits is not None:
                waited.append(self.clock.timing(partition, step, self.path.work(partition, self.path.screen.limits.train_cap(partition)), model_bytes))
        self.clock.advance_by_slowest([*timings, *waited, *lost])

    # --------------------------------------------------------------- state
    def _inner_state(self) -> dict:
        """The inner strategy's state (``checkpoint_state``), as plain arrays."""
        return {k: _plain(getattr(self.strategy, k)) for k in checkpoint_state(self.strategy)}

    def state_dict(self) -> dict:
        return {"inner": self._inner_state(), "virtual_time": self.clock.now, "client_updates": self.client_updates,
                "failed_rounds": self.liveness.in_a_row,
                "privacy": self.privacy.state_dict() if self.privacy is not None else None,
                **(self.tasks.state_dict() if self.tasks is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state["inner"].items():
            setattr(self.strategy, k, _restore(v))
        self.clock.now, self.client_updates = state["virtual_time"], state["client_updates"]
        self.liveness.in_a_row = state["failed_rounds"]
        if self.privacy is not None:
            if not state.get("privacy"):
                raise ValueError("the checkpoint has no privacy accountant: it was written without privacy=central")
            self.privacy.load_state_dict(state["privacy"])
            restore_ledger(self.path.recorder, self.privacy)
            if self.tasks is not None:
                self.tasks.load_state_dict(state)


def nearly_zero(weights: dict) -> dict:
    """``weights`` with the first coordinate of the first float array moved by one float step
    (at least 1e-12): an update of norm under 1e-6, a zero update that Flower 1.41's DP clip (which divides by the
    update's norm) can take. The server chooses it, so it depends on no node's data."""
    out = dict(weights)
    for k, v in weights.items():
        if v.dtype.kind == "f" and v.size:
            moved = v.copy()
            flat = moved.reshape(-1)
            # one float step up, at least 1e-12 (a step above 0 is denormal and squares to 0)
            flat[0] = flat[0] + max(np.spacing(np.abs(flat[0])), v.dtype.type(1e-12))
            out[k] = moved
            break
    return out
