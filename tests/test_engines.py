"""Both engines against scripted nodes on a fake Grid, with real Flower messages.

The synchronous engine is Flower's round loop on :class:`~flmnist.engine.guard.Guarded`;
the asynchronous one is :class:`~flmnist.engine.async_loop.AsyncLoop`. Nodes here are scripted: an
honest node replies with the model it received plus its own constant offset (or the offset
alone when asked for a delta), so every expected model is a hand computation; a bad node
commits one of :mod:`flmnist.client.faults`' attacks, replies with an error, or never replies.
Liveness settings are small, so each test takes about a second at most.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.serverapp.strategy import FedAdam, FedMedian, Krum

from flmnist.client import faults
from flmnist.core.arrays import to_weights
from flmnist.core.errors import RunFailed
from flmnist.engine.async_loop import AsyncLoop
from flmnist.engine.fleet import make_fleet
from flmnist.engine.guard import Guarded
from flmnist.engine.reply_path import ReplyPath
from flmnist.engine.sync import SyncEngine
from flmnist.flower_patches.node_order import RegistrationOrderGrid
from flmnist.observers.base import Observer
from flmnist.observers.checkpoint import rng_state
from flmnist.observers.recorder import RunRecorder
from flmnist.protocol import messages as p
from flmnist.protocol.screen import NodeLimits, ReplyScreen, ScreenSettings
from flmnist.protocol.settings import AsyncLoopSettings, PrivacySettings
from flmnist.strategies import FedAsync, FedAvg, FedBuff

SENT = p.TrainSettings(model={"_target_": "flmnist.ml.models.LogReg"}, partition={"_target_": "iid"}, num_partitions=4,
                       seed=0, holdout_fraction=0.1, local_steps=2, batch_size=4)
# Partition i holds 10 * (i + 1) training examples and i + 2 held-out ones.
LIMITS = NodeLimits(train_examples=(10, 20, 30, 40), holdout_examples=(2, 3, 4, 5))
START = {"w": np.array([[0.5, -1.0, 2.0], [0.0, 0.25, -0.5]], np.float32), "b": np.array([0.1, 0.2, 0.3], np.float32)}


def record(weights: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def shifted(weights: dict, offset: float) -> dict:
    return {k: v + np.float32(offset) for k, v in weights.items()}


def assert_weights(actual: dict | ArrayRecord, expected: dict) -> None:
    actual = to_weights(actual) if isinstance(actual, ArrayRecord) else actual
    assert set(actual) == set(expected)
    for k, value in expected.items():
        np.testing.assert_allclose(actual[k], value, rtol=1e-5, atol=1e-6)


class FakeNode:
    """A scripted node. ``behave(k)`` says what it does with its k-th train message (k = 1, 2, ...):
    ``"honest"``, a fault mode of :mod:`flmnist.client.faults`, ``"error"`` or ``"silent"``."""

    def __init__(self, partition: int, offset: float = 0.0, behave="honest", delay: float = 0.0,
                 query: str = "honest", evaluate: str = "honest", vanish: bool = False) -> None:
        self.partition, self.offset, self.delay = partition, offset, delay
        self.behave = behave if callable(behave) else (lambda k, b=behave: b)
        self.query_mode, self.evaluate_mode, self.vanish = query, evaluate, vanish
        self.name = p.simulated_node_name(partition)
        self.trained = 0

    @property
    def n(self) -> int:
        return LIMITS.train_examples[self.partition]

    def info(self) -> ConfigRecord:
        return ConfigRecord({p.NODE_NAME: self.name, p.DEVICE: "cpu", p.MACHINE: "test"})

    def answer(self, msg: Message) -> Message | None:
        kind = msg.metadata.message_type
        if kind == MessageType.QUERY:
            return self.answer_query(msg)
        if kind == MessageType.EVALUATE:
            return self.answer_evaluate(msg)
        self.trained += 1
        return self.answer_train(msg, self.behave(self.trained))

    def answer_query(self, msg: Message) -> Message | None:
        if self.query_mode == "silent":
            return None
        if self.query_mode == "error":
            return Message(Error(code=0, reason="no data here"), reply_to=msg)
        info = self.info()
        info[p.PARTITION_ID], info[p.TRAIN_EXAMPLES] = self.partition, self.n
        info[p.HOLDOUT_EXAMPLES] = LIMITS.holdout_examples[self.partition]
        content = RecordDict({p.NODE_INFO: info})
        if self.query_mode != "honest":
            faults.corrupt_query(self.query_mode, content)
        return Message(content, reply_to=msg)

    def evaluation(self, received: dict) -> MetricRecord:
        """Counts on the held-out part: all of digit 0, one wrong; the loss per example is the
        mean of the received model's ``b``, so each model's evaluation can be told apart."""
        total = LIMITS.holdout_examples[self.partition]
        loss = float(np.mean(received["b"])) if "b" in received else 0.5
        metrics = {p.NUM_EXAMPLES: total, p.LOSS_SUM: loss * total, p.CORRECT: total - 1,
                   p.PARTITION_ID: self.partition}
        for d in range(p.NUM_CLASSES):
            metrics[p.correct_key(d)] = total - 1 if d == 0 else 0
            metrics[p.total_key(d)] = total if d == 0 else 0
        return MetricRecord(metrics)

    def answer_evaluate(self, msg: Message) -> Message:
        received = to_weights(msg.content[p.ARRAYS]) if p.ARRAYS in msg.content else {}
        content = RecordDict({p.METRICS: self.evaluation(received), p.NODE_INFO: self.info()})
        if self.evaluate_mode != "honest":
            faults.corrupt_evaluate(self.evaluate_mode, content)
        return Message(content, reply_to=msg)

    def answer_train(self, msg: Message, behaviour: str) -> Message | None:
        if behaviour == "silent":
            return None
        if behaviour == "error":  # what Flower sends back when the ClientApp raises
            return Message(Error(code=0, reason="RuntimeError: injected fault"), reply_to=msg)
        sent = p.TrainSettings.from_record(msg.content[p.CONFIG])
        received = to_weights(msg.content[p.ARRAYS])
        zero = {k: np.zeros_like(v) for k, v in received.items()}
        weights = shifted(zero if sent.reply_delta else received, self.offset)
        metrics = MetricRecord({
            p.NUM_EXAMPLES: self.n, p.TRAIN_LOSS: 0.5, p.LOSS_TRACE: [0.5] * sent.batches_per_update(self.n),
            p.PARTITION_ID: self.partition, p.EXAMPLES_PROCESSED: sent.examples_per_update(self.n),
            p.TRAIN_TIME: 0.01,
        })
        content = RecordDict({p.ARRAYS: record(weights), p.METRICS: metrics, p.NODE_INFO: self.info()})
        if sent.evaluate_received:  # one exchange per round: the received model's evaluation too
            content[p.EVALUATION] = self.evaluation(received)
            if self.evaluate_mode != "honest":
                faults.corrupt_evaluate(self.evaluate_mode, RecordDict({p.METRICS: content[p.EVALUATION]}))
        if behaviour != "honest":
            faults.corrupt_train(behaviour, content, record(zero) if sent.reply_delta else msg.content[p.ARRAYS])
        return Message(content, reply_to=msg)


class FakeGrid:
    """``get_node_ids``/``push_messages``/``pull_messages``/``send_and_receive`` over FakeNodes.

    A reply becomes pullable ``delay`` seconds after its message was pushed; a node with
    ``vanish`` set leaves ``get_node_ids`` when it receives its first train message."""

    def __init__(self, nodes: dict[int, FakeNode]) -> None:
        self.nodes = nodes
        self.connected = set(nodes)
        self.pending: dict[str, tuple[float, Message]] = {}
        self.log: list[tuple[int, str]] = []  # (node id, message type) of every message pushed

    def get_node_ids(self):
        return sorted(self.connected)

    def get_nodes(self):
        """Flower's NodeInfo of the connected nodes, registered 10 us apart in ``nodes``' order."""
        base = datetime(2026, 11, 30, 12, tzinfo=UTC)
        return [NodeInfo(node_id=n, registered_at=(base + timedelta(microseconds=10 * i)).isoformat())
                for i, n in enumerate(self.nodes) if n in self.connected]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            message_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id  # what a SuperLink does
            node_id = msg.metadata.dst_node_id
            node = self.nodes[node_id]
            self.log.append((node_id, msg.metadata.message_type))
            if node.vanish and msg.metadata.message_type == MessageType.TRAIN:
                self.connected.discard(node_id)
                reply = None
            else:
                reply = node.answer(msg)
            if reply is not None:
                self.pending[message_id] = (time.monotonic() + node.delay, reply)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        ready = [m for m in message_ids if m in self.pending and self.pending[m][0] <= now]
        return [self.pending.pop(m)[1] for m in ready]

    def send_and_receive(self, messages, *, timeout=None):
        """Flower's barrier: every reply that will ever come (delays are not waited for)."""
        ids = self.push_messages(messages)
        return [self.pending.pop(m)[1] for m in ids if m in self.pending]

    def trained(self, node_id: int) -> int:
        return sum(1 for n, kind in self.log if n == node_id and kind == MessageType.TRAIN)


def make_path(hooks=(), sent=SENT, **screen) -> ReplyPath:
    return ReplyPath(ReplyScreen(ScreenSettings(**screen), LIMITS), sent, hooks)


class Spy(Observer):
    def __init__(self):
        self.updates, self.models = [], []

    def evaluate_updates(self, server_round, updates):
        self.updates.append((server_round, sorted(u.partition for u in updates)))

    def evaluate_global(self, server_round, arrays):
        self.models.append((server_round, to_weights(arrays)))


# ===================================================================== synchronous


def sync_round(strategy: Guarded, nodes: dict[int, FakeNode], weights: dict, server_round: int = 1):
    """One Flower round by hand: configure_train, every node answers, aggregate_train."""
    grid = FakeGrid(nodes)
    msgs = list(strategy.configure_train(server_round, record(weights), SENT.to_record(), grid))
    return strategy.aggregate_train(server_round, grid.send_and_receive(msgs))


def weighted_offset(*nodes: FakeNode) -> float:
    return sum(n.n * n.offset for n in nodes) / sum(n.n for n in nodes)


@pytest.mark.parametrize("bad", ["nan", "dtype", "shape", "complex-nan", "huge-examples", "partition-inf",
                                 "bad-node-info", "error", "silent", "scale"])
def test_one_bad_reply_among_honest_ones_leaves_the_average_of_the_honest_ones(task_identity, bad):
    """Conditions: FedAvg; for ``scale`` (weights x 1e30) a ``max_update_norm`` is set."""
    honest = [FakeNode(0, 0.01), FakeNode(1, 0.02)]
    nodes = {11: honest[0], 12: honest[1], 13: FakeNode(2, 0.5, behave=bad)}
    path = make_path(max_update_norm=1.0 if bad == "scale" else None)
    strategy = Guarded(FedAvg(min_available_nodes=3, min_train_nodes=3), path)
    arrays, metrics = sync_round(strategy, nodes, START)
    assert_weights(arrays, shifted(START, weighted_offset(*honest)))  # (10 * 0.01 + 20 * 0.02) / 30
    assert metrics[p.NUM_EXAMPLES] == 30
    assert strategy.failed_rounds == 0
    assert sum(path.rejected.values()) + sum(path.failed.values()) == (0 if bad == "silent" else 1)


def test_rounds_without_a_usable_update_fail_and_too_many_in_a_row_end_the_run(task_identity):
    bad = {11: FakeNode(0, behave="nan"), 12: FakeNode(1, behave="error")}
    good = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}
    strategy = Guarded(FedAvg(min_available_nodes=2), make_path(), max_failed_rounds=2)
    assert sync_round(strategy, bad, START, 1) == (None, None)  # the global model stays
    assert strategy.failed_rounds == 1
    arrays, _ = sync_round(strategy, good, START, 2)
    assert arrays is not None and strategy.failed_rounds == 0  # a usable round resets the count
    assert sync_round(strategy, bad, to_weights(arrays), 3) == (None, None)
    with pytest.raises(RunFailed, match=r"2 rounds in a row without a usable update \(max_failed_rounds=2\)"):
        sync_round(strategy, bad, to_weights(arrays), 4)


class Counting(Observer):
    """An observer with state and a summary section: how many global models it saw."""

    def __init__(self, start: int = 0):
        self.seen = start

    def evaluate_global(self, server_round, arrays):
        self.seen += 1

    def state(self):
        return {"seen": self.seen}

    def load_state(self, state):
        self.seen = state["seen"]

    def finish(self, wall_time=None):
        return {"seen": self.seen}


def test_two_observers_of_one_class_keep_their_own_state_and_summary_section(task_identity, tmp_path):
    """``+observers.NAME._target_=...`` can add a second observer of a class already there: each
    keeps its own checkpoint state and summary section (the second's state overwrote the first's)."""
    first, second = Counting(0), Counting(100)
    path = make_path(hooks=[first, second])
    state = path.state()
    assert state["hooks"] == {"Counting": {"seen": 0}, "Counting_2": {"seen": 100}}
    again = [Counting(), Counting()]
    make_path(hooks=again).load_state(state)
    assert [o.seen for o in again] == [0, 100]
    path.recorder = RunRecorder(tmp_path, 1, 0.99, printer=lambda line: None)
    path.finish()
    assert path.recorder.extra["counting"] == {"seen": 0} and path.recorder.extra["counting_2"] == {"seen": 100}


def test_the_screens_counters_survive_a_checkpoint(task_identity):
    """A resumed run's summary goes on counting from the checkpoint: replies screened, screening
    time and the effect guard's counters (they restarted from 0 while rejections per node carried on)."""
    from flmnist.engine.effect_guard import EffectGuard

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02, behave="nan")}
    path = make_path(guard_max_harm=None)
    sync_round(Guarded(FedAvg(fraction_evaluate=0.0), path), nodes, START, 1)
    resumed = make_path(guard_max_harm=None)
    resumed.load_state(path.state())
    before, after = path.stats(), resumed.stats()
    assert after["replies_screened"] == before["replies_screened"] == 2
    assert after["screen_seconds"] == before["screen_seconds"] > 0
    assert after["rejected_per_node"] == before["rejected_per_node"] == {"node 1": 1}
    assert resumed.devices == path.devices and set(path.devices) == {"node 0"}
    path.identities.refused_claims = 3  # (a resumed run's count started again from 0)
    again = make_path(guard_max_harm=None)
    again.load_state(path.state())
    assert again.stats()["identities"]["refused_claims"] == 3
    path.guard, resumed.guard = EffectGuard(probe=None), EffectGuard(probe=None)
    path.guard.judged, path.guard.probed, path.guard.evaluations, path.guard.rejected = 7, 2, 9, 1
    path.guard.images = 9000
    resumed.load_state(path.state())
    assert resumed.guard.state() == path.guard.state() == {"seconds": 0.0, "evaluations": 9, "images": 9000, "judged": 7,
                                                            "probed": 2, "rejected": 1}
    # a checkpoint from before the guard stopped early: each of its evaluations took the whole probe
    from flmnist.ml.models import LogReg
    from flmnist.observers.probe import Probe

    older = EffectGuard(probe=Probe(torch.zeros(1000, 1, 28, 28), torch.arange(1000) % 10, LogReg, size=500))
    older.load_state({k: v for k, v in path.guard.state().items() if k != "images"})
    assert (older.evaluations, older.images) == (9, 9 * 500)


def test_a_rejected_aggregate_leaves_no_trace_in_the_inner_strategy(task_identity, monkeypatch):
    """FedAvgM's momentum and current model are rolled back with a rejected (NaN) aggregate:
    rounds 1, (2 rejected), 3 end where rounds 1, 3 alone do."""
    nodes = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.03)}

    def run(poison_round_2: bool):
        strategy = Guarded(FedAvg(min_available_nodes=2, server_learning_rate=0.7, server_momentum=0.9), make_path())
        w = to_weights(sync_round(strategy, nodes, START, 1)[0])
        if poison_round_2:
            inner_aggregate = type(strategy.strategy).aggregate_train

            def nan_aggregate(self, server_round, replies):
                arrays, metrics = inner_aggregate(self, server_round, replies)  # updates momentum, then ...
                return record({k: np.full_like(v, np.nan) for k, v in to_weights(arrays).items()}), metrics

            with monkeypatch.context() as m:
                m.setattr(type(strategy.strategy), "aggregate_train", nan_aggregate)
                momentum = [v.copy() for v in strategy.strategy.momentum_vector]
                assert sync_round(strategy, nodes, w, 2)[0] is None  # the global model stays
                assert strategy.path.aggregates_rejected == 1 and strategy.failed_rounds == 1
                for before, after in zip(momentum, strategy.strategy.momentum_vector):
                    np.testing.assert_array_equal(before, after)
                assert_weights(strategy.strategy.current_arrays, w)
        return to_weights(sync_round(strategy, nodes, w, 3)[0])

    assert_weights(run(True), run(False))


def test_an_inner_aggregate_that_is_malformed_or_raises_fails_only_its_round(task_identity, monkeypatch):
    strategy = Guarded(FedAvg(min_available_nodes=2), make_path())
    monkeypatch.setattr(type(strategy.strategy), "aggregate_train",
                        lambda self, rnd, replies: (record({"w": START["w"]}), None))
    assert sync_round(strategy, {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}, START) == (None, None)
    assert strategy.path.aggregates_rejected == 1

    def broken(self, rnd, replies):
        raise ZeroDivisionError("inner strategy bug")

    monkeypatch.setattr(type(strategy.strategy), "aggregate_train", broken)
    assert sync_round(strategy, {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}, START) == (None, None)
    assert strategy.failed_rounds == 2
    # The run that such rounds end names what failed, not "no replies arrived" (a review): both replies came.
    assert strategy.liveness.last_problem == ("FedAvg could not aggregate the accepted updates (ZeroDivisionError: "
                                              "inner strategy bug)")
    strategy = Guarded(FedAvg(min_available_nodes=2), make_path(), max_failed_rounds=1)
    monkeypatch.setattr(type(strategy.strategy), "aggregate_train",
                        lambda self, rnd, replies: (record({"w": START["w"]}), None))
    with pytest.raises(RunFailed, match=r"last reason: the aggregate of the accepted updates was rejected \(.+\)$"):
        sync_round(strategy, {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}, START)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the attack itself
def test_fedadam_is_not_frozen_by_a_finite_but_huge_update(task_identity):
    """Conditions: the screen's norm bounds are off (``max_norm_ratio`` null), so weights x 1e30,
    being finite, reach FedAdam; its second moment overflows to inf while its aggregate stays
    finite. The guard must refuse that round (model and optimiser state unchanged), so later
    honest rounds still move the model."""
    honest = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}
    attacked = {**honest, 13: FakeNode(2, 0.01, behave="scale")}
    strategy = Guarded(FedAdam(min_available_nodes=2, eta=0.1), make_path(max_norm_ratio=None))
    arrays, _ = sync_round(strategy, attacked, START, 1)
    assert arrays is None
    assert strategy.path.aggregates_rejected == 1
    assert not strategy.strategy.m_t and not strategy.strategy.v_t  # rolled back to "not started"
    arrays, _ = sync_round(strategy, honest, START, 2)
    assert all(np.isfinite(v).all() for v in strategy.strategy.v_t.values())
    # The refused round left no trace: round 2 ends where a FedAdam that never saw round 1 does.
    fresh = Guarded(FedAdam(min_available_nodes=2, eta=0.1), make_path(max_norm_ratio=None))
    expected = to_weights(sync_round(fresh, honest, START, 2)[0])
    assert_weights(arrays, expected)
    assert all(np.all(expected[k] - START[k] > 0.01) for k in START)  # and the model did move


def test_robust_aggregators_work_behind_the_guard(task_identity):
    """FedMedian takes the coordinate-wise median; Krum (one malicious node assumed) picks an
    honest update; the boosted update (10x, finite) passes the screen but not the aggregator."""
    three = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02), 13: FakeNode(2, 0.04, behave="boost")}
    median = Guarded(FedMedian(min_available_nodes=3, min_train_nodes=3), make_path())
    arrays, _ = sync_round(median, three, START)
    assert_weights(arrays, shifted(START, 0.02))  # median of 0.01, 0.02 and 0.4
    assert not median.path.rejected
    four = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.012), 13: FakeNode(2, 0.014),
            14: FakeNode(3, 0.05, behave="boost")}
    krum = Guarded(Krum(min_available_nodes=4, min_train_nodes=4, num_malicious_nodes=1), make_path())
    chosen = to_weights(sync_round(krum, four, START)[0])
    assert not krum.path.rejected
    assert any(all(np.allclose(chosen[k], v) for k, v in shifted(START, o).items()) for o in (0.01, 0.012, 0.014))


def test_sync_engine_runs_flower_rounds_end_to_end_on_a_fake_grid(task_identity):
    """Three rounds of FedAvg through Flower's Strategy.start; node 2 poisons every train and
    evaluate reply. Every round adds the honest nodes' weighted offset to the model."""
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04),
             103: FakeNode(2, 0.3, behave="nan", evaluate="eval-inconsistent")}
    spy = Spy()
    path = make_path(hooks=[spy])
    strategy = Guarded(FedAvg(min_available_nodes=3, min_train_nodes=3, min_evaluate_nodes=3), path)
    engine = SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=3, round_timeout=5.0)
    final = engine.run(record(START))
    step = weighted_offset(nodes[101], nodes[102])  # (10 * 0.01 + 20 * 0.04) / 30 = 0.03
    assert_weights(final, shifted(START, 3 * step))
    assert [r for r, _ in spy.models] == [0, 1, 2, 3]
    for r, w in spy.models:
        assert_weights(w, shifted(START, r * step))
    assert spy.updates == [(1, [0, 1]), (2, [0, 1]), (3, [0, 1])]
    assert path.rejected == {"node 2": 6}  # 3 train and 3 evaluate replies
    assert strategy.client_updates == 9 and strategy.failed_rounds == 0


def test_a_sync_run_in_which_no_round_made_a_model_fails_even_below_max_failed_rounds(task_identity):
    """num_rounds=2, max_failed_rounds=3, every reply bad: the run fails naming the last reason
    (it used to end normally with the initial model, reported finished)."""
    nodes = {101: FakeNode(0, 0.01, behave="nan"), 102: FakeNode(1, 0.02, behave="error")}
    path = make_path(guard_max_harm=None)
    strategy = Guarded(FedAvg(fraction_evaluate=0.0), path, max_failed_rounds=3)
    engine = SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=2, round_timeout=5.0)
    with pytest.raises(RunFailed, match=r"no round of 2 made a usable update: the global model is the initial one"):
        engine.run(record(START))


def test_a_run_whose_nodes_all_send_back_the_model_they_were_sent_fails(task_identity):
    """Every node returns the model it was sent (update norm 0, a valid reply otherwise): each round
    counted as advanced and the run reported finished with the initial model (a review). Such a
    round fails, and a run of them fails as one whose replies were all bad; one node that trains
    among them keeps the round."""
    still = {101 + i: FakeNode(i, 0.0) for i in range(2)}
    path = make_path(guard_max_harm=None)
    strategy = Guarded(FedAvg(fraction_evaluate=0.0), path, max_failed_rounds=3)
    engine = SyncEngine(FakeGrid(still), strategy, path, SENT.to_record(), num_rounds=2, round_timeout=5.0)
    with pytest.raises(RunFailed, match=r"no round of 2 made a usable update: the global model is the initial one; "
                                        r"last reason: every accepted update is the model its node was sent"):
        engine.run(record(START))
    assert strategy.failed_rounds == 2
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2), make_path())
    arrays, _ = sync_round(strategy, {11: FakeNode(0, 0.0), 12: FakeNode(1, 0.02)}, START)
    assert arrays is not None and strategy.failed_rounds == 0


def test_a_run_ended_by_failed_rounds_reports_the_rejections_that_ended_it(tmp_path, task_identity):
    """summary.json's screen section was set only with a new global model: a run ended by
    max_failed_rounds said no reply was screened and named no rejected node."""
    nodes = {101: FakeNode(0, 0.01, behave="nan"), 102: FakeNode(1, 0.02, behave="nan")}
    recorder = RunRecorder(tmp_path, 2, 0.9, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(guard_max_harm=None), LIMITS), SENT, (), recorder)
    engine = SyncEngine(FakeGrid(nodes), Guarded(FedAvg(fraction_evaluate=0.0), path, max_failed_rounds=1), path,
                        SENT.to_record(), num_rounds=2, round_timeout=5.0)
    with pytest.raises(RunFailed):
        engine.run(record(START))
    engine.finish()
    assert recorder.screen_stats["rejected_per_node"] == {"node 0": 1, "node 1": 1}
    assert recorder.summary("failed")["rounds_completed"] == 0


class Stopping(Observer):
    def __init__(self):
        self.steps = []

    def stopping(self, step):
        self.steps.append(step)


def test_an_engine_stop_is_announced_so_the_last_step_is_evaluated():
    """The privacy budget stops a run after round 3 of 10 with eval.every=5: observers hear of it
    before the round's global model, and the digit evaluation evaluates round 3 as its last."""
    from flmnist.observers.evaluation import DigitEvaluation

    spy = Stopping()
    evaluation = DigitEvaluation(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), lambda: None,
                                 num_rounds=10, every=5)
    path = make_path(hooks=[spy, evaluation])
    assert not evaluation.is_scheduled(3)
    path.request_stop(3, "privacy budget")
    assert spy.steps == [3] and evaluation.is_scheduled(3)


def test_the_last_round_is_checkpointed_whatever_checkpoint_every_says(task_identity, tmp_path):
    """checkpoint_every=5, num_rounds=7: checkpoints at rounds 5 and 7 (the last), so extending the
    run starts from round 7, not 5 (rounds 6 and 7 were redone, or lost by a shorter extension)."""
    import json

    from flmnist.core.run_files import CHECKPOINT_INFO
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02)}
    recorder = RunRecorder(tmp_path, 7, 0.99, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, (), recorder, checkpoint_every=5)
    seen = []
    save = path.save_checkpoint
    path.save_checkpoint = lambda kind, step, *rest: (seen.append(step), save(kind, step, *rest))
    SyncEngine(FakeGrid(nodes), Guarded(FedAvg(fraction_evaluate=0.0), path), path, SENT.to_record(),
               num_rounds=7, round_timeout=5.0).run(record(START))
    assert seen == [5, 7]
    assert json.loads((tmp_path / CHECKPOINT_INFO).read_text())["round"] == 7


def test_a_resumed_sync_run_does_only_the_remaining_rounds(task_identity):
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    spy = Spy()
    path = make_path(hooks=[spy])
    strategy = Guarded(FedAvg(min_available_nodes=2, fraction_evaluate=0.0), path)
    engine = SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=3)
    checkpoint = {"engine": strategy.state_dict(), "screen": {}, "rng": rng_state(), "round": 2}
    final = engine.run(record(START), checkpoint)
    assert_weights(final, shifted(START, 0.03))
    assert [r for r, _ in spy.models] == [3] and spy.updates == [(3, [0, 1])]


class ShuffledGrid(FakeGrid):
    """Lists its node ids in a fixed scrambled order, as a SuperLink may (not sorted)."""

    def __init__(self, nodes: dict[int, FakeNode], order: list[int]) -> None:
        super().__init__(nodes)
        self.order = order

    def get_node_ids(self):
        return [n for n in self.order if n in self.connected]


class GlobalRandomDraws(Observer):
    """Draws from the ``random`` module's global generator after every round, as Flower's own
    threads in the ServerApp process do at wall-clock times (heartbeat interval, back-off jitter)."""

    def __init__(self, draws: int) -> None:
        self.draws = draws

    def evaluate_global(self, server_round, arrays):
        import random

        for _ in range(self.draws):
            random.random()


def trained_partitions(grid: FakeGrid, ordered: bool, seed: int | None = 7, draws: int = 0, rounds: int = 6,
                       checkpoint: dict | None = None, in_train: bool = False) -> tuple[list[list[int]], SyncEngine]:
    """The partitions trained in each round of a sync run on ``grid`` (FedAvg, half the nodes a
    round). ``ordered``: behind the RegistrationOrderGrid. ``seed``: the engine's sampling seed;
    None: Flower's global ``random``, seeded 7 (as run_setup.build_run seeds it). ``draws``:
    global draws by someone else after each round."""
    import random

    spy = Spy()
    path = make_path(hooks=[spy, GlobalRandomDraws(draws)])
    strategy = Guarded(FedAvg(fraction_train=0.5, fraction_evaluate=0.5 if in_train else 0.0, min_train_nodes=1,
                              min_evaluate_nodes=1, min_available_nodes=4), path, evaluate_in_train=in_train)
    random.seed(7)
    engine = SyncEngine(RegistrationOrderGrid(grid) if ordered else grid, strategy, path, SENT.to_record(),
                        num_rounds=rounds, round_timeout=5.0, seed=seed)
    engine.run(record(START), checkpoint)
    assert [r for r, _ in spy.updates] == list(range(1 + (checkpoint or {}).get("round", 0), rounds + 1))
    return [partitions for _, partitions in spy.updates], engine


def test_the_sync_engine_samples_the_same_partitions_whatever_the_node_ids_and_their_order(task_identity):
    """Issue 9: Flower samples ``random.sample(list(grid.get_node_ids()), n)``; node ids are new
    every run and listed in no fixed order, and other threads draw from the global ``random``.
    Listed in registration order (Flower's simulation registers partition i as the i-th node),
    with the engine's own sampling generator, the same seed trains the same partitions every
    round, and no node is sent anything but its train messages. The premises are checked too:
    in Flower's order, or with the global generator drawn from between rounds, it does not."""
    one = FakeGrid({101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03), 104: FakeNode(3, 0.04)})
    other_nodes = {9_000_017: FakeNode(0, 0.01), 55: FakeNode(1, 0.02), 4_242: FakeNode(2, 0.03),
                   731: FakeNode(3, 0.04)}  # registered in this order: partitions 0-3
    order = [4_242, 9_000_017, 55, 731]
    other = ShuffledGrid(other_nodes, order)
    first, _ = trained_partitions(one, ordered=True)
    assert all(len(r) == 2 for r in first) and len({tuple(r) for r in first}) > 1  # a real sample each round
    assert trained_partitions(other, ordered=True, draws=3)[0] == first
    assert {kind for _, kind in other.log} == {MessageType.TRAIN}
    # The premises: Flower's order, or the shared global generator, change the sample.
    assert (trained_partitions(FakeGrid(one.nodes), ordered=False, seed=None)[0]
            != trained_partitions(ShuffledGrid(other_nodes, order), ordered=False, seed=None)[0])
    assert (trained_partitions(FakeGrid(one.nodes), ordered=True, seed=None)[0]
            != trained_partitions(FakeGrid(one.nodes), ordered=True, seed=None, draws=3)[0])


def test_a_resumed_sync_run_samples_as_the_uninterrupted_one(task_identity):
    """The sampling generator's state is part of the engine's checkpoint state."""
    from flmnist.observers.checkpoint import _pack, _unpack

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03), 104: FakeNode(3, 0.04)}
    whole, _ = trained_partitions(FakeGrid(nodes), ordered=True, rounds=6)
    head, engine = trained_partitions(FakeGrid(nodes), ordered=True, rounds=3)
    checkpoint = _unpack(_pack({"engine": engine.state_dict(), "screen": {}, "rng": rng_state(), "round": 3}))
    tail, _ = trained_partitions(FakeGrid(nodes), ordered=True, seed=123, rounds=6, draws=2, checkpoint=checkpoint)
    assert head + tail == whole
    # client evaluation in the train replies: the evaluate exchange of the first run's last round,
    # which the longer run does not make, drew from the generator before the checkpoint (a review)
    whole, _ = trained_partitions(FakeGrid(nodes), ordered=True, rounds=6, in_train=True)
    head, engine = trained_partitions(FakeGrid(nodes), ordered=True, rounds=3, in_train=True)
    assert engine.strategy.exchanged == 3
    checkpoint = _unpack(_pack({"engine": engine.state_dict(), "screen": {}, "rng": rng_state(), "round": 3}))
    tail, _ = trained_partitions(FakeGrid(nodes), ordered=True, seed=123, rounds=6, checkpoint=checkpoint, in_train=True)
    assert head + tail == whole


def test_a_late_node_takes_its_place_in_registration_order():
    """A node that registers later (a board joining late) is listed after the earlier ones; the
    order is worked out again only when the connected ids change."""
    grid = FakeGrid({101: FakeNode(2), 102: FakeNode(0), 103: FakeNode(1), 104: FakeNode(3)})
    grid.connected = {101, 102, 104}
    served = RegistrationOrderGrid(grid)
    assert served.get_node_ids() == [101, 102, 104]
    calls = []
    grid.get_nodes = lambda f=grid.get_nodes: calls.append(1) or f()
    assert served.get_node_ids() == [101, 102, 104] and not calls
    grid.connected.add(103)
    assert served.get_node_ids() == [101, 102, 103, 104] and len(calls) == 1


# ==================================================================== asynchronous


def make_loop(nodes: dict[int, FakeNode], strategy, sent=SENT, fleet=None, screen=None, hooks=(), stop_at=None,
              grid_class=None, **settings):
    defaults = {"max_server_updates": 3, "eval_every": 1, "update_timeout": 5.0, "progress_timeout": 30.0,
                "prefetch": 0}  # the loop one task at a time per node (prefetch: its own tests)
    path = ReplyPath(ReplyScreen(ScreenSettings(**(screen or {})), LIMITS), sent, hooks, stop_at=stop_at)
    grid = (grid_class or FakeGrid)(nodes)
    loop = AsyncLoop(grid, strategy, path, AsyncLoopSettings(**{**defaults, **settings}), fleet=fleet,
                     poll_interval=0.01)
    return loop, grid


class UpdateTable(Observer):
    """An update evaluation's shape (DigitEvaluation's, asynchronous): one entry per update."""

    def evaluate_updates(self, step, updates):
        return {"update_eval": {f"{u.name} (client update {step})": {"step": step} for u in updates}}


def test_async_update_evaluations_land_in_the_row_of_the_server_update_they_arrived_at(task_identity, tmp_path):
    """Node 1's replies are rejected, so client updates outnumber server updates: each accepted
    update's evaluation goes in the row of the server update it arrived at, rows stay the run's
    3 server updates (keyed by client-update number they ran past them, stray rows that made
    rounds_completed too high), and a row's table gains entries instead of losing them."""
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.02, behave="nan")}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), hooks=[UpdateTable()], max_server_updates=3)
    loop.path.recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    loop.run(record(START))
    rows = loop.path.recorder.rows
    assert sorted(rows) == [0, 1, 2, 3] and loop.counts["rejected"] >= 1
    entries = [(version, name, e["step"]) for version, r in rows.items() for name, e in r.get("update_eval", {}).items()]
    assert len(entries) == 3 and all(name.startswith("node 0 (client update") for _, name, _ in entries)
    assert [version for version, _, _ in entries] == [0, 1, 2]  # update k+1 arrived at version k
    assert max(step for _, _, step in entries) > 3  # numbered by client update, past the last version


def test_a_resumed_deployed_loop_counts_its_time_budget_from_the_run_so_far(task_identity):
    """Real clock (deployment): a run checkpointed 100 s in resumes 100 s in, so
    async_loop.time_budget bounds the whole run, not each attempt (it restarted from 0)."""
    nodes = {101: FakeNode(0, 0.01)}
    first, _ = make_loop(nodes, FedAsync(alpha=0.5))
    first.t0 -= 100.0
    checkpoint = {"engine": first.state_dict(), "screen": first.path.state(), "rng": rng_state()}
    resumed, _ = make_loop(nodes, FedAsync(alpha=0.5))
    resumed.restore(checkpoint)
    assert 100.0 <= resumed.elapsed() < 105.0


def test_a_deployed_time_budget_ends_the_wait_for_a_reply_too(task_identity):
    """Real clock, async_loop.time_budget=1 s, one node that never answers and an update timeout
    of 60 s: the loop stops waiting when the budget runs out (it waited out the 60 s timeout),
    reports the task unanswered, and the run, which made no server update, fails."""
    loop, _ = make_loop({101: FakeNode(0, 0.01, behave="silent")}, FedAsync(alpha=0.5), max_server_updates=None,
                        time_budget=1.0, update_timeout=60.0)
    start = time.monotonic()
    with pytest.raises(RunFailed, match="no server update in 0 client updates"):
        loop.run(record(START))
    assert 1.0 <= time.monotonic() - start < 5.0 and loop.version == 0
    assert loop.stats_dict()["unanswered_at_end"] == {"node 0": 1}


def test_the_async_loop_keeps_only_the_models_its_jobs_in_flight_were_sent(task_identity):
    """FedAsync, 30 server updates: the loop keeps the current model and those of jobs still out
    (it kept every version a job had last left at staleness 0: 31 models after 30 updates)."""
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02, delay=0.02)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), max_server_updates=30)
    loop.run(record(START))
    assert loop.version == 30 and len(loop.sent_models) <= 3, sorted(loop.sent_models)


DELTA = dataclasses.replace(SENT, reply_delta=True)  # what FedBuff's nodes are sent


@pytest.mark.parametrize("bad, outcome", [
    ("silent", "timed out"), ("error", "failed"), ("nan", "rejected"), ("shape", "rejected"),
    ("bad-node-info", "rejected"), ("huge-examples", "rejected"), ("scale", "rejected"),
])
@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_the_async_loop_applies_only_accepted_updates(task_identity, kind, bad, outcome):
    """Node 0 is honest (0.15 s per update), node 1 misbehaves. Conditions: node 0's updates are
    never stale (no other update is applied), so FedAsync adds alpha * offset per server update
    and FedBuff (K = 2 = concurrency, eta_g = 1) adds the offset per server update, which takes
    two of node 0's updates. Each run outlasts the 0.25 s update timeout."""
    honest = FakeNode(0, 0.01, delay=0.15)
    nodes = {101: honest, 102: FakeNode(1, 0.5, behave=bad, delay=0.03)}
    strategy = FedAsync(alpha=0.5) if kind == "fedasync" else FedBuff(buffer_size=10)
    versions = 3 if kind == "fedasync" else 2
    loop, _ = make_loop(nodes, strategy, sent=DELTA if kind == "fedbuff" else SENT, screen={"max_update_norm": 1.0},
                         update_timeout=0.25, max_server_updates=versions)
    final = loop.run(record(START))
    per_update = 0.5 * honest.offset if kind == "fedasync" else honest.offset
    assert_weights(final, shifted(START, versions * per_update))
    assert loop.version == versions and loop.counts["applied"] == (3 if kind == "fedasync" else 4)
    assert loop.counts[outcome] >= 1 and set(loop.node_counts) == {"node 0"}
    assert loop.staleness == [0] * loop.counts["applied"]


def test_a_fast_failing_node_cannot_end_a_run_that_honest_nodes_advance(task_identity):
    """Node 1 sends NaN every 10 ms, node 0 an honest update every 0.15 s: far more than
    max_consecutive_failures rejections fall between two honest updates, but the run goes on."""
    nodes = {101: FakeNode(0, 0.01, delay=0.15), 102: FakeNode(1, behave="nan", delay=0.01)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), max_consecutive_failures=5)
    final = loop.run(record(START))
    assert_weights(final, shifted(START, 3 * 0.5 * 0.01))
    assert loop.counts["rejected"] > 5


def test_max_consecutive_failures_ends_a_run_in_which_every_reply_is_bad(task_identity):
    nodes = {101: FakeNode(0, behave="nan"), 102: FakeNode(1, behave="error")}
    loop, _ = make_loop(nodes, FedAsync(), max_consecutive_failures=6)
    with pytest.raises(RunFailed, match=r"6 client updates in a row failed or were rejected "
                                        r"\(async_loop.max_consecutive_failures=6\)"):
        loop.run(record(START))
    assert loop.version == 0


def test_an_async_run_that_never_updates_the_model_fails(task_identity):
    """Every reply rejected, but the run ends on max_client_updates before max_consecutive_failures:
    no server update was made, so the run failed (it said finished, exit 0, final accuracy null),
    as a synchronous run none of whose rounds made a model does."""
    nodes = {101: FakeNode(0, behave="nan"), 102: FakeNode(1, behave="nan")}
    loop, _ = make_loop(nodes, FedAsync(), max_server_updates=None, max_client_updates=4,
                        max_consecutive_failures=50)
    with pytest.raises(RunFailed, match=r"no server update in 4 client updates: the global model is the initial "
                                        r"one; last reason: node \d: "):
        loop.run(record(START))


@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_an_async_run_whose_nodes_all_send_back_the_model_they_were_sent_fails(task_identity, kind):
    """Every node returns the model it was sent (update norm 0, a valid reply otherwise): the loop
    applied them, advanced the server version and reported the run finished with the initial
    model (the synchronous engine failed such a run already). Fewer of them than
    max_consecutive_failures fail the run at its end; more end it on the streak."""
    strategy = (lambda: FedAsync(alpha=0.5)) if kind == "fedasync" else (lambda: FedBuff(buffer_size=2))
    sent = SENT if kind == "fedasync" else DELTA
    still = {101: FakeNode(0, 0.0), 102: FakeNode(1, 0.0)}
    loop, _ = make_loop(still, strategy(), sent=sent, max_server_updates=2, max_consecutive_failures=50)
    with pytest.raises(RunFailed, match=r"no client update of \d+ trained: every accepted update was the model "
                                        r"its node was sent \(update norm 0\)"):
        loop.run(record(START))
    assert loop.version == 2 and loop.liveness.trained == 0
    loop, _ = make_loop(still, strategy(), sent=sent, max_server_updates=None, max_client_updates=40,
                        max_consecutive_failures=6)
    with pytest.raises(RunFailed, match=r"6 client updates in a row failed or were rejected \(async_loop."
                                        r"max_consecutive_failures=6\); last: node \d: the model its node was sent"):
        loop.run(record(START))
    # one node that trains among them keeps the run (and its still partner cannot end it)
    loop, _ = make_loop({101: FakeNode(0, 0.01, delay=0.01), 102: FakeNode(1, 0.0, delay=0.02)}, strategy(), sent=sent,
                        max_server_updates=3, max_consecutive_failures=3)
    loop.run(record(START))
    assert loop.version == 3 and loop.liveness.trained >= 1


def test_a_failed_async_run_reports_every_update_it_processed(task_identity, tmp_path):
    """A run ended by a streak of bad updates made no server version after them, so its statistics
    (async_stats.json) were last reported before them: it said 'client updates 0', no outcome,
    for a run that processed 6 and failed on them. At the end, whatever the outcome, they are
    reported; an update of norm 0 that ends the run is counted as not applied."""
    from flmnist.observers.recorder import RunRecorder

    for nodes, outcome in (({101: FakeNode(0, behave="nan"), 102: FakeNode(1, behave="error")}, None),
                           ({101: FakeNode(0, 0.0), 102: FakeNode(1, 0.0)}, "not applied: run failed")):
        loop, _ = make_loop(nodes, FedAsync(alpha=0.5), max_server_updates=None, max_client_updates=40,
                            max_consecutive_failures=6)
        loop.path.recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
        with pytest.raises(RunFailed, match="6 client updates in a row"):
            loop.run(record(START))
        loop.finish()  # as the ServerApp does, whatever the outcome
        stats = loop.path.recorder.async_stats
        assert stats["client_updates"] == loop.stats.client_updates >= 6
        assert sum(stats["outcomes"].values()) == stats["client_updates"], stats["outcomes"]
        assert stats["virtual_time"] is None and 0 < stats["loop_seconds"] < 30  # no fleet: real time, the loop's
        if outcome:
            assert stats["outcomes"][outcome] == 1 and stats["outcomes"]["applied"] == stats["client_updates"] - 1


def test_progress_timeout_ends_a_run_whose_nodes_never_reply(task_identity):
    nodes = {101: FakeNode(0, behave="silent"), 102: FakeNode(1, behave="silent")}
    loop, _ = make_loop(nodes, FedAsync(), update_timeout=60.0, progress_timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RunFailed, match=r"no new server version for .* \(async_loop.progress_timeout=0.3\)"):
        loop.run(record(START))
    assert time.monotonic() - start < 5.0


def test_a_task_still_in_flight_when_the_run_ends_is_reported_unanswered_and_never_applied(task_identity):
    """Node 1 never answers and its 60 s timeout outlasts the run, which node 0 ends: the loop
    reports node 1's task as unanswered at the end instead of dropping it from the statistics."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.5, behave="silent")}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), update_timeout=60.0, max_server_updates=2)
    final = loop.run(record(START))
    assert_weights(final, shifted(START, 2 * 0.5 * 0.01))
    stats = loop.stats_dict()
    assert stats["unanswered_at_end"] == {"node 1": 1} and stats["outcomes"] == {"applied": 2}
    assert "timed out" not in loop.counts and set(loop.node_counts) == {"node 0"}


def test_a_node_that_leaves_frees_its_slot_before_the_update_timeout(task_identity):
    """Node 1 disappears from get_node_ids once it gets work; with a 60 s update timeout its
    slot goes to the idle node 2 as soon as the loop sees it gone."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.02, vanish=True),
             103: FakeNode(2, 0.03, delay=0.05)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), concurrency=2, max_server_updates=4, update_timeout=60.0)
    start = time.monotonic()
    loop.run(record(START))
    assert time.monotonic() - start < 5.0
    assert loop.counts["unavailable"] == 1 and loop.counts["applied"] == 4
    assert grid.trained(102) == 1 and grid.trained(103) >= 1
    assert [n.node_id for n in loop.away] == [102]


def test_an_idle_node_flower_no_longer_lists_gets_no_work_until_it_is_back(task_identity):
    """Node 1 leaves after answering the loop's query, while it waits for a slot (concurrency 1):
    once the loop has seen Flower's list, node 1 is put away instead of being sent a task that
    would wait out the 60 s update timeout; node 2 trains in its turn and the run ends at once."""

    class LeavingGrid(FakeGrid):
        def push_messages(self, messages):
            ids = super().push_messages(messages)
            if any(m.metadata.dst_node_id == 102 and m.metadata.message_type == MessageType.QUERY for m in messages):
                self.connected.discard(102)  # gone after saying who it is
            return ids

    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03, delay=0.05)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), concurrency=1, max_server_updates=4, update_timeout=60.0,
                           grid_class=LeavingGrid)
    start = time.monotonic()
    loop.run(record(START))
    assert time.monotonic() - start < 5.0 and loop.counts["applied"] == 4 and "unavailable" not in loop.counts
    assert grid.trained(102) == 0 and grid.trained(103) >= 1 and [n.node_id for n in loop.away] == [102]


def test_with_fewer_slots_than_nodes_every_node_takes_its_turn(task_identity):
    """concurrency=2 of 4 nodes: a node that finishes waits behind the idle ones, so all four
    train (a node put back at the front of the line trained again and again: nodes 2 and 3 never did)."""
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03), 104: FakeNode(3, 0.04)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), concurrency=2, max_server_updates=8, update_timeout=5.0)
    loop.run(record(START))
    assert all(grid.trained(n) >= 2 for n in nodes), {n: grid.trained(n) for n in nodes}
    assert dict(loop.node_counts) == {"node 0": 2, "node 1": 2, "node 2": 2, "node 3": 2}


def test_discovery_keeps_malformed_nodes_out_and_the_run_goes_on(task_identity):
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02), 103: FakeNode(2, query="bad-node-info"),
             104: FakeNode(3, query="error"), 105: FakeNode(3, query="silent")}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), update_timeout=0.3)
    loop.run(record(START))
    assert set(loop.nodes) == {101, 102} and loop.refused == {103}
    assert loop.version == 3
    assert all(grid.trained(n) == 0 for n in (103, 104, 105))
    assert {partition for partition in (n.partition for n in loop.nodes.values())} == {0, 1}


def test_a_run_without_any_valid_node_fails_with_a_clear_error(task_identity):
    nodes = {101: FakeNode(0, query="bad-node-info"), 102: FakeNode(1, query="error")}
    loop, _ = make_loop(nodes, FedAsync(), update_timeout=0.3)
    with pytest.raises(RunFailed, match="no node answered the query with a valid node-info"):
        loop.run(record(START))


def test_stale_updates_beyond_max_staleness_are_dropped(task_identity):
    """Simulated fleet (virtual clock, no jitter): one node 10x faster than the other. The slow
    node's update arrives after about ten server versions and is dropped (max_staleness = 1);
    the model holds only the fast node's updates, each applied at staleness 0."""
    fleet = make_fleet("mixed", 2, seed=0, jitter_sigma=0.0, latency=0.0, devices={
        "fast": {"share": 0.5, "speed": 10.0}, "slow": {"share": 0.5, "speed": 1.0}})
    fast = [p.name for p in fleet.profiles].index("fast")
    nodes = {101: FakeNode(fast, 0.01), 102: FakeNode(1 - fast, 0.5)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5, max_staleness=1), fleet=fleet, max_server_updates=12)
    final = loop.run(record(START))
    assert loop.counts["too stale"] == 1 and loop.counts["applied"] == 12
    assert loop.staleness == [0] * 12 and set(loop.node_counts) == {p.simulated_node_name(fast)}
    # dropped unread: the stale reply never entered the screen's windows (its norm went in before)
    assert loop.path.screened == 12 and len(loop.path.norms) == 12
    expected = START
    for _ in range(12):
        expected = {k: 0.5 * v + 0.5 * (v + np.float32(0.01)) for k, v in expected.items()}
    assert_weights(final, expected)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_fedbuff_buffers_only_accepted_deltas_on_the_virtual_clock(task_identity, prefetch):
    """Simulated homogeneous fleet without jitter, K = 2: all updates take the same virtual time,
    so replies are processed in dispatch order: node 0, node 1 (-> version 1), node 2 (NaN,
    rejected), node 0 (trained on version 0: staleness 1), node 1 (-> version 2). A simulation
    queues nothing ahead (``prefetch`` is for SuperNodes' idle polls): the same figures."""
    fleet = make_fleet("homogeneous", 3, seed=0, jitter_sigma=0.0)
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04), 103: FakeNode(2, 0.5, behave="nan")}
    loop, _ = make_loop(nodes, FedBuff(buffer_size=2), sent=DELTA, fleet=fleet, max_server_updates=2,
                        prefetch=prefetch)
    final = loop.run(record(START))
    assert loop.counts["rejected"] == 1 and loop.counts["applied"] == 4 and loop.version == 2
    assert loop.staleness == [0, 0, 1, 0]
    # Delta_bar = sum_k n_k s(tau_k) Delta_k / sum_k n_k, with s(tau) = 1 / sqrt(1 + tau)
    first = (10 * 0.01 + 20 * 0.04) / 30
    second = (10 * 0.01 / np.sqrt(2) + 20 * 0.04) / 30
    assert_weights(final, shifted(START, first + second))


def test_a_node_claiming_no_training_data_is_timed_by_its_partition_on_the_virtual_clock(task_identity):
    """Node 1 says in its query that it holds no training examples: the simulated clock timed its
    updates by that claim, so they took no compute time, finished first every time and it was sent
    work again and again (a review). Timed by the partition the server knows it holds, the run is
    the honest one: the same updates per node, the same virtual time, the same model."""

    class NoData(FakeNode):
        def answer_query(self, msg):
            reply = super().answer_query(msg)
            reply.content[p.NODE_INFO][p.TRAIN_EXAMPLES] = 0
            return reply

    runs = []
    for node1 in (FakeNode, NoData):
        fleet = make_fleet("homogeneous", 2, seed=0, jitter_sigma=0.0)
        loop, _ = make_loop({101: FakeNode(0, 0.01), 102: node1(1, 0.04)}, FedAsync(alpha=0.5), fleet=fleet,
                            max_server_updates=9)
        runs.append((loop.run(record(START)), dict(loop.node_counts), loop.clock.now))
    (honest, honest_counts, honest_time), (lied, lied_counts, lied_time) = runs
    assert honest_counts[p.simulated_node_name(0)] > honest_counts[p.simulated_node_name(1)]  # node 0's 10 vs 20
    assert lied_counts == honest_counts and lied_time == pytest.approx(honest_time)
    assert_weights(lied, to_weights(honest))


def test_a_dropped_device_update_costs_its_slot_the_timeout_in_virtual_time(task_identity):
    """Simulated fleet with dropout 0.2 and seed 2: node 1's first update is dropped, no other of
    the first seven updates of either node is. Its real reply is ignored; its slot is busy for
    update_timeout virtual seconds, so node 0 applies every update until then, and the drop is
    counted when its virtual time comes."""
    fleet = make_fleet("homogeneous", 2, seed=2, jitter_sigma=0.0, dropout=0.2)
    assert fleet.timing(1, 1, 1, 0).dropped and not fleet.timing(0, 1, 1, 0).dropped  # the premise
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    timeout = 3 * fleet.timing(0, 1, SENT.examples_per_update(LIMITS.train_examples[0]), 0).duration
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), fleet=fleet, max_server_updates=6, update_timeout=timeout)
    loop.run(record(START))
    assert loop.counts["dropped (device)"] == 1
    assert loop.node_counts[p.simulated_node_name(0)] >= 3 and loop.counts["applied"] == 6
    assert loop.clock.now >= timeout  # the dropped update held its slot for the timeout


# ================================================================ attribution, stop at target


class Applied(Observer):
    """Records what the engines hand to attribution, and reports a test accuracy of 0.3 per step."""

    def __init__(self):
        self.applied = []  # (step, before, {node: delta})

    def updates_applied(self, step, before, deltas, key=None):
        self.applied.append((step, {k: v.copy() for k, v in before.items()}, dict(deltas)))

    def evaluate_global(self, server_round, arrays):
        return {"test_accuracy": 0.3 * server_round}


def test_the_sync_engine_hands_attribution_each_accepted_update_as_its_delta(task_identity):
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04), 103: FakeNode(2, 0.3, behave="nan")}
    spy = Applied()
    path = make_path(hooks=[spy])
    strategy = Guarded(FedAvg(min_available_nodes=3, min_train_nodes=3), path)
    SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=2, round_timeout=5.0).run(record(START))
    assert [(step, sorted(deltas)) for step, _, deltas in spy.applied] == [(1, ["node 0", "node 1"]),
                                                                          (2, ["node 0", "node 1"])]
    for step, before, deltas in spy.applied:  # before: the global model the round started from
        assert_weights(before, shifted(START, (step - 1) * 0.03))  # (10 * 0.01 + 20 * 0.04) / 30 per round
        for name, offset in (("node 0", 0.01), ("node 1", 0.04)):
            assert_weights(deltas[name], {k: np.full_like(v, offset) for k, v in START.items()})


@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_the_async_loop_hands_attribution_each_applied_update_as_its_delta(task_identity, kind):
    """Node 1's NaN updates are rejected and never attributed; node 0's come as its offset, applied
    to the global model of the moment (FedAsync with alpha 0.5 moves it by half the offset)."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.5, behave="nan", delay=0.01)}
    spy = Applied()
    strategy = FedAsync(alpha=0.5) if kind == "fedasync" else FedBuff(buffer_size=10)
    loop, _ = make_loop(nodes, strategy, sent=DELTA if kind == "fedbuff" else SENT, hooks=[spy], max_server_updates=2)
    loop.run(record(START))
    assert spy.applied and all(list(deltas) == ["node 0"] for _, _, deltas in spy.applied)
    for _, before, deltas in spy.applied:
        assert_weights(deltas["node 0"], {k: np.full_like(v, 0.01) for k, v in START.items()})
    if kind == "fedasync":
        assert [step for step, _, _ in spy.applied] == [1, 2]
        assert_weights(spy.applied[1][1], shifted(START, 0.005))
    else:  # K = 2 (the concurrency): both updates of a step, on the model the step started from
        assert [step for step, _, _ in spy.applied] == [1, 1, 2, 2]
        assert_weights(spy.applied[1][1], START)
        assert_weights(spy.applied[2][1], shifted(START, 0.01))


@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_a_rejected_async_server_step_is_rolled_back_and_never_attributed(task_identity, monkeypatch, kind):
    """The second server step's aggregate is NaN (made so after the strategy folded it in): the
    global model stays, FedBuff's momentum is what it was before that step (it must not carry the
    rejected mean into the next), attribution never sees the step's updates, and the run goes on."""
    fleet = make_fleet("homogeneous", 2, seed=0, jitter_sigma=0.0)
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    strategy = FedAsync(alpha=0.5) if kind == "fedasync" else FedBuff(buffer_size=2, server_momentum=0.9)
    real, steps, momentum_seen = type(strategy).apply, [], []

    def apply(self, model, update, num_examples, staleness):
        momentum = getattr(self, "momentum", None)
        momentum_seen.append(None if momentum is None else {k: v.copy() for k, v in momentum.items()})
        new = real(self, model, update, num_examples, staleness)
        if new is not None:
            steps.append(new)
            if len(steps) == 2:
                return {k: np.full_like(v, np.nan) for k, v in new.items()}
        return new

    monkeypatch.setattr(type(strategy), "apply", apply)
    spy = Applied()
    loop, _ = make_loop(nodes, strategy, sent=DELTA if kind == "fedbuff" else SENT, fleet=fleet, hooks=[spy],
                        max_server_updates=2)
    final = loop.run(record(START))
    assert loop.path.aggregates_rejected == 1 and loop.version == 2 and len(steps) == 3
    assert_weights(final, steps[2])  # the third step, taken from the second's global model
    per_step = 2 if kind == "fedbuff" else 1  # updates a server step applies
    assert len(spy.applied) == 2 * per_step  # the two accepted steps' updates only
    assert [step for step, _, _ in spy.applied] == [1] * per_step + [2] * per_step
    assert loop.counts["applied"] == 2 * per_step and loop.counts["dropped (step rejected)"] == per_step
    if kind == "fedbuff":  # applies 3 and 4 made the rejected step; 5 starts from the momentum 3 did
        assert momentum_seen[0] is None and momentum_seen[2] is not None
        for k, v in momentum_seen[2].items():
            np.testing.assert_array_equal(momentum_seen[4][k], v)


def test_an_async_step_that_leaves_the_strategys_state_non_finite_is_rejected_and_rolled_back(task_identity):
    """A strategy whose second step keeps a finite model but overflows its own state (as an
    optimizer's second moment can): the step is rejected and the state it had restored."""
    from flmnist.strategies.asynchronous import AsyncStrategy

    class Overflowing(AsyncStrategy):
        def __init__(self):
            super().__init__()
            self.moment, self.steps, self.rolled_back = {"m": np.zeros(2)}, 0, 0

        def apply(self, model, update, num_examples, staleness):
            self.steps += 1
            self.moment = {"m": np.full(2, np.inf if self.steps == 2 else float(self.steps))}
            return {k: v + np.float32(0.01) for k, v in model.items()}

        def state_dict(self):
            return {"moment": self.moment}

        def step_rejected(self, before):
            self.moment, self.rolled_back = before["moment"], self.rolled_back + 1

    strategy = Overflowing()
    loop, _ = make_loop({101: FakeNode(0, 0.01)}, strategy, fleet=make_fleet("homogeneous", 1, seed=0,
                        jitter_sigma=0.0), max_server_updates=2)
    final = loop.run(record(START))
    assert loop.path.aggregates_rejected == 1 and strategy.rolled_back == 1 and strategy.steps == 3
    assert strategy.moment["m"].tolist() == [3.0, 3.0] and loop.counts["dropped (step rejected)"] == 1
    assert_weights(final, shifted(START, 0.02))


def test_server_steps_rejected_in_a_row_end_the_run_naming_the_setting(task_identity):
    """Every step unsound: each reply passed the screen, so the nodes' failure count never grew
    and the run went on until progress_timeout (an hour), saying 'last problem: none' (a review)."""
    from flmnist.strategies.asynchronous import AsyncStrategy

    class AlwaysInf(AsyncStrategy):
        def apply(self, model, update, num_examples, staleness):
            return {k: np.full_like(v, np.inf) for k, v in model.items()}

    loop, _ = make_loop({101: FakeNode(0, 0.01)}, AlwaysInf(), fleet=make_fleet("homogeneous", 1, seed=0,
                        jitter_sigma=0.0), max_server_updates=50, max_consecutive_failures=3)
    with pytest.raises(RunFailed, match=r"3 server steps in a row were rejected as unsound "
                                        r"\(async_loop.max_consecutive_failures\)"):
        loop.run(record(START))


def test_fedbuffs_buffer_at_the_end_of_a_run_is_applied_and_attributed_when_it_is_extended(task_identity, tmp_path):
    """FedBuff, K = 2, stopped after 3 client updates: one server step, and the third update still
    in the buffer (not applied, listed as buffered). The final evaluation of version 1 keeps its
    row's counters (they became the buffered update's). The checkpoint keeps the buffer; the extended
    run's first step applies and attributes it with the fourth (it was applied, never attributed)."""
    from flmnist.observers.checkpoint import _pack, _unpack

    fleet = make_fleet("homogeneous", 2, seed=0, jitter_sigma=0.0)
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    spy = Applied()
    first, _ = make_loop(nodes, FedBuff(buffer_size=2), sent=DELTA, fleet=fleet, hooks=[spy],
                         max_server_updates=None, max_client_updates=3, eval_every=5)
    first.path.recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    weights = first.run(record(START))
    assert first.version == 1 and first.counts["applied"] == 2 and len(spy.applied) == 2
    assert sum(first.stats_dict()["buffered_at_end"].values()) == 1
    row = first.path.recorder.rows[1]
    assert row["client_updates"] == 2 and len(row["nodes"]) == 2 and row["test_accuracy"] == 0.3
    checkpoint = _unpack(_pack({"engine": first.state_dict(), "screen": first.path.state(), "rng": rng_state()}))
    again = Applied()
    resumed, _ = make_loop(nodes, FedBuff(buffer_size=2), sent=DELTA, fleet=make_fleet("homogeneous", 2, seed=0,
                           jitter_sigma=0.0), hooks=[again], max_server_updates=None, max_client_updates=4)
    resumed.run(weights, checkpoint)
    assert resumed.version == 2 and resumed.counts["applied"] == 4
    assert [step for step, _, _ in again.applied] == [2, 2]  # the buffered update and the fourth
    assert not resumed.stats_dict()["buffered_at_end"]


@pytest.mark.parametrize("checkpoint_every", [1, 5])
def test_an_async_run_is_checkpointed_as_it_ended(task_identity, tmp_path, checkpoint_every):
    """FedBuff (K=2), every version evaluated: the run ends on max_client_updates=3 with the third
    update in the buffer, after version 1 was evaluated. The last checkpoint holds that buffer and
    3 client updates (it was version 1's, buffer empty, 2 updates: an extension lost the third,
    though the summary promised it; with checkpoint_every=5, version 1 was never checkpointed)."""
    from flmnist.observers.checkpoint import load_checkpoint
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    loop, _ = make_loop(nodes, FedBuff(buffer_size=2), sent=DELTA, fleet=make_fleet("homogeneous", 2, seed=0,
                        jitter_sigma=0.0), max_server_updates=None, max_client_updates=3, eval_every=1)
    loop.path.recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    loop.path.checkpoint_every = checkpoint_every
    loop.run(record(START))
    assert loop.version == 1 and sum(loop.stats_dict()["buffered_at_end"].values()) == 1
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["round"] == 1 and len(saved["engine"]["pending"]) == 1
    assert saved["engine"]["loop"]["client_updates"] == 3


def test_a_node_that_joins_a_resumed_async_run_late_goes_on_from_its_own_count(task_identity):
    """Node 1 had 3 updates at the checkpoint and connects only after the resumed run started:
    its next task is its 4th (server-round 4, which seeds its data order and faults), and the
    count stays in later checkpoints (it started again at 1, repeating its first batches)."""
    from flmnist.observers.checkpoint import _pack, _unpack

    first, _ = make_loop({101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02)}, FedAsync(alpha=0.5), max_server_updates=6)
    weights = first.run(record(START))
    checkpoint = _unpack(_pack({"engine": first.state_dict(), "screen": first.path.state(), "rng": rng_state()}))
    assert checkpoint["engine"]["loop"]["node_updates"] == {0: 4, 1: 3}
    late = FakeNode(1, 0.02, delay=0.05)
    rounds = []
    answer = late.answer_train
    late.answer_train = lambda msg, b: (rounds.append(p.server_round(msg.content[p.CONFIG])), answer(msg, b))[1]
    resumed, grid = make_loop({101: FakeNode(0, 0.01, delay=0.05), 102: late}, FedAsync(alpha=0.5),
                              max_server_updates=14)
    grid.connected.discard(102)
    listed = grid.get_node_ids
    calls = []

    def get_node_ids():
        calls.append(1)
        if len(calls) == 3:
            grid.connected.add(102)  # connects once the run is under way
        return listed()

    grid.get_node_ids = get_node_ids
    resumed.transport.directory.reask_after = 0.0
    resumed.run(weights, checkpoint)
    assert rounds and rounds[0] == 4
    assert resumed.state_dict()["loop"]["node_updates"][1] == 3 + len(rounds)


def test_stop_at_target_ends_a_sync_run_after_the_evaluation_that_reaches_it(task_identity):
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    spy = Applied()  # test accuracy 0.3, 0.6, 0.9 ... after rounds 1, 2, 3 ...
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [spy], stop_at=0.55)
    strategy = Guarded(FedAvg(min_available_nodes=2), path)
    final = SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=10,
                       round_timeout=5.0).run(record(START))
    assert path.target_reached == 2 and len(spy.applied) == 2  # no third round was trained
    assert_weights(final, shifted(START, 2 * 0.03))


def test_a_run_stopped_at_its_target_with_client_evaluation_in_train_evaluates_its_last_model(tmp_path, task_identity):
    """sampling.client_evaluation=in_train, target reached at round 2 of 10: no round 3 comes to
    evaluate round 2's model in its train replies, so the stop makes that evaluate exchange (before
    the stop's checkpoint; round 2's client metrics were missing)."""
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    sent = dataclasses.replace(SENT, evaluate_received=True)
    recorder = RunRecorder(tmp_path, 10, 0.55, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), sent, [Applied()], recorder, stop_at=0.55)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_evaluate_nodes=2), path, evaluate_in_train=True)
    grid = FakeGrid(nodes)
    SyncEngine(grid, strategy, path, sent.to_record(), num_rounds=10, round_timeout=5.0).run(record(START))
    assert path.target_reached == 2
    assert [kind for _, kind in grid.log] == [MessageType.TRAIN] * 4 + [MessageType.EVALUATE] * 2
    step = weighted_offset(FakeNode(0, 0.01), FakeNode(1, 0.04))
    assert [recorder.rows[r]["client_loss"] for r in (0, 1, 2)] == pytest.approx([0.2 + r * step for r in (0, 1, 2)])


def test_a_run_checkpointed_at_its_target_stops_again_at_once_when_resumed(task_identity):
    """Killed after its stop's checkpoint, before summary.json: resumed, the run trained one more
    step (the stop itself was not restored, only the step that reached the target). It is now
    stopped at that step, with its stopped_early section, and trains nothing."""
    from flmnist.observers.stop import StopAtTarget

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [Applied()], stop_at=0.55)
    first = SyncEngine(FakeGrid(nodes), Guarded(FedAvg(min_available_nodes=2), path), path, SENT.to_record(),
                       num_rounds=10, round_timeout=5.0)
    first.run(record(START))  # test accuracy 0.3 a round: the target reached at round 2
    checkpoint = {"engine": first.state_dict(), "screen": path.state(), "rng": rng_state(), "round": 2}
    again = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [Applied()], stop_at=0.55)
    grid = FakeGrid(nodes)
    SyncEngine(grid, Guarded(FedAvg(min_available_nodes=2), again), again, SENT.to_record(), num_rounds=10,
               round_timeout=5.0).run(record(START), checkpoint)
    assert again.stopped == (2, StopAtTarget.reason) and grid.log == []  # no round trained


def test_stop_at_target_ends_an_async_run_after_the_evaluation_that_reaches_it(task_identity):
    nodes = {101: FakeNode(0, 0.01, delay=0.02), 102: FakeNode(1, 0.01, delay=0.02)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), hooks=[Applied()], stop_at=0.85, max_server_updates=20)
    loop.run(record(START))
    assert loop.path.target_reached == 3 and loop.version == 3


def test_without_stop_at_target_a_run_goes_to_its_end(task_identity):
    nodes = {101: FakeNode(0, 0.01, delay=0.02), 102: FakeNode(1, 0.01, delay=0.02)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), hooks=[Applied()], max_server_updates=5)
    loop.run(record(START))
    assert loop.path.target_reached is None and loop.version == 5


# ============================================================ one exchange per round


def run_sync_recorded(tmp_path, evaluate_in_train: bool, rounds: int = 3, **node_kwargs):
    """A 3-round FedAvg run on the fake grid, recorded: (rows by round, the grid's message log)."""
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04, **node_kwargs)}
    sent = dataclasses.replace(SENT, evaluate_received=evaluate_in_train)
    recorder = RunRecorder(tmp_path / str(evaluate_in_train), rounds, 0.9, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), sent, (), recorder)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2), path,
                       evaluate_in_train=evaluate_in_train)
    grid = FakeGrid(nodes)
    engine = SyncEngine(grid, strategy, path, sent.to_record(), num_rounds=rounds, round_timeout=5.0)
    engine.run(record(START))
    return recorder.rows, [kind for _, kind in grid.log]


def test_client_evaluation_in_the_train_reply_gives_the_metrics_of_the_evaluate_exchange(tmp_path, task_identity):
    """sampling.client_evaluation=in_train: one message per node a round (the last round adds its
    evaluate exchange), and each round's client metrics are the evaluate exchange's, exactly: the
    next round's train replies evaluate the model that round made."""
    exchanged, log_exchange = run_sync_recorded(tmp_path, evaluate_in_train=False)
    in_train, log_in_train = run_sync_recorded(tmp_path, evaluate_in_train=True)
    assert log_exchange == [MessageType.TRAIN] * 2 + [MessageType.EVALUATE] * 2 + \
        [MessageType.TRAIN] * 2 + [MessageType.EVALUATE] * 2 + [MessageType.TRAIN] * 2 + [MessageType.EVALUATE] * 2
    assert log_in_train == [MessageType.TRAIN] * 6 + [MessageType.EVALUATE] * 2
    fields = ["client_loss", "client_accuracy", *(f"client_acc_digit_{d}" for d in range(p.NUM_CLASSES))]
    step = weighted_offset(FakeNode(0, 0.01), FakeNode(1, 0.04))
    for r in (1, 2, 3):
        assert {k: in_train[r][k] for k in fields} == {k: exchanged[r][k] for k in fields}, r
        assert in_train[r]["client_loss"] == pytest.approx(0.2 + r * step)  # the model of round r
    assert in_train[0]["client_loss"] == pytest.approx(0.2)  # the initial model, from round 1's replies
    assert "client_loss" not in exchanged[0]


class StopAfter(Observer):
    """Asks the run to end after ``step`` while that step's updates are screened, as the privacy
    budget does (ReplyPath.request_stop inside aggregate_train)."""

    def __init__(self, step: int) -> None:
        self.step, self.path = step, None

    def evaluate_updates(self, server_round, updates):
        if server_round == self.step:
            self.path.request_stop(server_round, "privacy budget")


def test_a_run_stopped_inside_a_round_still_gets_its_last_models_client_evaluation(tmp_path, task_identity):
    """sampling.client_evaluation=in_train and the privacy budget ends the run after round 2 of 3:
    no round 3 comes to evaluate round 2's model in its train replies, so round 2 has its evaluate
    exchange (it had none: the final model's client metrics were missing)."""
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    sent = dataclasses.replace(SENT, evaluate_received=True)
    recorder = RunRecorder(tmp_path, 3, 0.9, printer=lambda line: None)
    stop = StopAfter(2)
    path = stop.path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), sent, (stop,), recorder)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2), path,
                       evaluate_in_train=True)
    grid = FakeGrid(nodes)
    SyncEngine(grid, strategy, path, sent.to_record(), num_rounds=3, round_timeout=5.0).run(record(START))
    assert [kind for _, kind in grid.log] == [MessageType.TRAIN] * 4 + [MessageType.EVALUATE] * 2
    step = weighted_offset(FakeNode(0, 0.01), FakeNode(1, 0.04))
    assert recorder.rows[2]["client_loss"] == pytest.approx(0.2 + 2 * step) and 3 not in recorder.rows


@pytest.mark.parametrize("offset, accuracy", [(0.02, 3 / 5), (0.5, 1 / 2)], ids=["clipped", "unclipped"])
def test_an_update_refused_after_the_screen_brings_no_evaluation_of_the_received_model(tmp_path, task_identity,
                                                                                         offset, accuracy):
    """in_train under privacy=client (updates clipped to 1.0 by the nodes): node 1's update of norm
    1.5 is refused as unclipped, so its report on the model it received is left out too (it was
    counted): each round's client accuracy is node 0's alone, 1 of 2 held-out images, not 3 of 5."""
    from flmnist.observers.recorder import RunRecorder

    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, offset)}
    sent = dataclasses.replace(SENT, evaluate_received=True)
    recorder = RunRecorder(tmp_path, 2, 0.9, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(max_norm_ratio=None, clip_to_median=None), LIMITS), sent, (),
                     recorder, update_clip=1.0)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2), path,
                       evaluate_in_train=True)
    SyncEngine(FakeGrid(nodes), strategy, path, sent.to_record(), num_rounds=2, round_timeout=5.0).run(record(START))
    assert recorder.rows[0]["client_accuracy"] == pytest.approx(accuracy)
    assert recorder.rows[1]["num_updates"] == (2 if offset < 0.1 else 1)


def test_a_malformed_evaluation_in_a_train_reply_costs_its_update_and_nothing_else(tmp_path, task_identity):
    rows, _ = run_sync_recorded(tmp_path, evaluate_in_train=True, evaluate="eval-inconsistent")
    assert [rows[r]["num_updates"] for r in (1, 2, 3)] == [1, 1, 1]
    assert all("correct=8 is outside 0..3" in rows[r]["rejections"][0] for r in (1, 2, 3)), rows[1]["rejections"]
    assert rows[1]["client_accuracy"] == pytest.approx(1 / 2)  # node 0 alone: 2 held out, 1 right


class QueueWatch(FakeGrid):
    """A FakeGrid whose nodes work through their messages one after the other, as a SuperNode does
    (a reply is ready ``delay`` s after the node's previous one, or after its push), and that notes,
    for each train reply pulled, how many train messages its node had been pushed and how many of
    its train replies had been pulled before it."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.free: dict[int, float] = {}  # node id -> when it finishes its last message
        self.pulled: dict[int, int] = {}
        self.seen: list[tuple[int, int, int]] = []  # (node id, pushed so far, pulled before)

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, message_id in zip(messages, ids):
            if message_id in self.pending:
                node = msg.metadata.dst_node_id
                ready = max(time.monotonic(), self.free.get(node, 0.0)) + self.nodes[node].delay
                self.pending[message_id] = (ready, self.pending[message_id][1])
                self.free[node] = ready
        return ids

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for reply in replies:
            if reply.metadata.message_type != MessageType.TRAIN:
                continue
            node = reply.metadata.src_node_id
            self.seen.append((node, self.trained(node), self.pulled.get(node, 0)))
            self.pulled[node] = self.pulled.get(node, 0) + 1
        return replies


def test_a_deployed_async_node_has_its_next_task_queued_before_it_replies(task_identity):
    """async_loop.prefetch=1 (the default) on real SuperNodes: whenever a node's reply arrives, the
    task after it is already pushed, so the node never asks for work and finds none (Flower's 3 s
    idle sleep). The queued task carries the model of its time: one version staler. FedAsync with
    alpha=0.5 weights a stale update by alpha / sqrt(1 + staleness)."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.04, delay=0.08)}
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, ())
    grid = QueueWatch(nodes)
    settings = AsyncLoopSettings(max_server_updates=6, eval_every=1, update_timeout=5.0, progress_timeout=30.0)
    loop = AsyncLoop(grid, FedAsync(alpha=0.5), path, settings, poll_interval=0.01)
    loop.run(record(START))
    assert settings.prefetch == 1 and loop.version == 6
    assert {n for n, _, _ in grid.seen} == {101, 102}
    assert all(pushed >= pulled_before + 2 for _, pushed, pulled_before in grid.seen), grid.seen
    assert max(loop.staleness) >= 1


class Offline(FakeNode):
    """A node the SuperLink reports offline: every message to it is answered, at once, with the
    error reply Flower 1.41 makes for it (ErrorCode.NODE_UNAVAILABLE, from the SuperLink: linkstate
    utils.create_message_error_unavailable_res_message). ``pretends``: the node's own reply with
    that code instead."""

    def __init__(self, *args, pretends: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.pretends = pretends

    def answer_train(self, msg, behaviour):
        from flwr.app import Error
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node offline"), reply_to=msg)
        if not self.pretends:
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # (read-only: as Flower builds it)
        return reply


def test_a_node_replying_unavailable_itself_is_screened_as_failed(task_identity):
    """The NODE_UNAVAILABLE code in a node's own reply is no pass around the screen: its failure."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: Offline(1, 0.02, pretends=True), 103: FakeNode(2, 0.03, delay=0.05)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), concurrency=3, max_server_updates=3)
    loop.run(record(START))
    assert loop.stats.counts["failed"] >= 1 and "unavailable" not in loop.stats.counts, loop.stats.counts
    assert loop.path.failed


@pytest.mark.parametrize("gone", ["vanished", "offline"])
def test_a_node_that_is_gone_gets_no_stream_of_tasks(task_identity, gone):
    """With prefetch=1 a node that vanished with two tasks in flight, or whose every message
    Flower answers at once as unavailable, gets no more: it goes away and the others train (it
    was sent a new task for each failed one, 2,160 in 0.7 s, counted as client updates). The
    error replies count as unavailable, not as the node's failures."""
    bad = FakeNode(1, 0.02, vanish=True) if gone == "vanished" else Offline(1, 0.02)
    nodes = {101: FakeNode(0, 0.01, delay=0.2), 102: bad, 103: FakeNode(2, 0.03, delay=0.2)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), concurrency=2, max_server_updates=4, update_timeout=60.0,
                           prefetch=1)
    loop.run(record(START))
    assert grid.trained(102) <= 2 and loop.version == 4 and loop.stats.client_updates <= 4 + 2
    if gone == "vanished":
        assert [n.node_id for n in loop.away] == [102]
    else:  # Flower's error reply says the node is gone: not its failure, not screened
        assert loop.stats.counts["unavailable"] >= 1 and "failed" not in loop.stats.counts, loop.stats.counts
        assert not loop.path.failed


class Unstored(FakeGrid):
    """Node 102 is still listed, but the SuperLink stores no message for it: Flower 1.41 answers
    its push with "" for a message id (runtime_handlers.push_messages)."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.unstored = 0

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id == 102 and msg.metadata.message_type == MessageType.TRAIN:
                self.unstored += 1
                ids.append("")
            else:
                ids += super().push_messages([msg])
        return ids


class Refusing(FakeGrid):
    """The SuperLink takes no train message at all: Flower 1.41's HttpGrid.push_messages returns []
    for a payload over its limit."""

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            return []
        return super().push_messages(messages)


def test_a_run_whose_tasks_flower_never_stores_fails_at_once_saying_so(task_identity):
    """Every push refused: the run ends after max_consecutive_failures, naming why (it waited out
    progress_timeout, an hour by default, blaming no progress)."""
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), grid_class=Refusing, concurrency=3, max_consecutive_failures=3,
                        progress_timeout=3600.0)
    started = time.monotonic()
    with pytest.raises(RunFailed, match=r"3 client updates in a row .*last: Flower stored no task for node id 10\d"):
        loop.run(record(START))
    assert time.monotonic() - started < 30 and loop.stats.counts["not sent"] == 3


def test_a_task_flower_did_not_store_is_not_counted_and_its_node_waits_away(task_identity):
    """A push answered with "" sent nothing: no job waits out its timeout on it, the node's update
    count stays, and it waits among the away until Flower lists it at a later refresh."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03, delay=0.05)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), grid_class=Unstored, concurrency=3, max_server_updates=4,
                           update_timeout=60.0)
    started = time.monotonic()
    loop.run(record(START))
    assert loop.version == 4 and time.monotonic() - started < 30
    assert [n.node_id for n in loop.away] == [102] and loop.nodes[102].updates == 0, (grid.unstored, loop.idle, loop.away)
    # (tried again at the first refresh, which lists it, then at most once per 5 s refresh)
    assert 1 <= grid.unstored <= 2 + (time.monotonic() - started) / 5 and "timed out" not in loop.stats.counts


def test_a_dpsgd_task_flower_did_not_store_is_charged_back(task_identity):
    """DP-SGD charges a task before it leaves (a server killed as it goes has counted it); one
    Flower did not store is taken back: node 102 trained nothing and has spent nothing."""
    from flmnist.engine.privacy import SampleAccountant

    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.02), 103: FakeNode(2, 0.03, delay=0.05)}
    loop, grid = make_loop(nodes, FedAsync(alpha=0.5), grid_class=Unstored, concurrency=3, max_server_updates=4,
                           update_timeout=60.0)
    loop.sample_dp = SampleAccountant(PrivacySettings("dpsgd", noise_multiplier=1.0, target_delta=1e-5), SENT,
                                      LIMITS.train_examples)
    loop.run(record(START))
    assert grid.unstored >= 1 and 1 not in loop.sample_dp.tasks
    assert sum(loop.sample_dp.tasks.values()) == grid.trained(101) + grid.trained(103)


class SerialGrid(FakeGrid):
    """A node works on one message at a time, as a SuperNode does: a queued message's reply comes
    ``delay`` after the one before it, not after its own push; every TTL is kept."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.free_at: dict[int, float] = {}
        self.ttls: list[float] = []

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg, message_id in zip(messages, ids):
            node_id = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.TRAIN:
                self.ttls.append(msg.metadata.ttl)
            done = max(time.monotonic(), self.free_at.get(node_id, 0.0)) + self.nodes[node_id].delay
            self.free_at[node_id] = done
            if message_id in self.pending:
                self.pending[message_id] = (done, self.pending[message_id][1])
        return ids


def test_a_queued_task_is_timed_from_when_its_node_can_start_it(task_identity):
    """Updates take 0.3 s, update_timeout is 0.5 s, prefetch=1: the task queued behind a node's
    current one finishes 0.6 s after it was pushed, in time (it timed out, counted from its push,
    so every queued update was lost); its TTL covers the task ahead of it too."""
    nodes = {101: FakeNode(0, 0.01, delay=0.3), 102: FakeNode(1, 0.02, delay=0.3)}
    grid = SerialGrid(nodes)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, ())
    settings = AsyncLoopSettings(max_server_updates=6, eval_every=1, update_timeout=0.5, progress_timeout=30.0,
                                 prefetch=1)
    loop = AsyncLoop(grid, FedAsync(alpha=0.5), path, settings, poll_interval=0.01)
    loop.run(record(START))
    assert loop.version == 6 and "timed out" not in loop.stats.counts, loop.stats.counts
    assert sorted(set(grid.ttls)) == [0.5, 1.0]


def test_prefetch_zero_keeps_one_task_per_node(task_identity):
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.04, delay=0.08)}
    grid = QueueWatch(nodes)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, ())
    settings = AsyncLoopSettings(max_server_updates=6, eval_every=1, update_timeout=5.0, progress_timeout=30.0,
                                 prefetch=0)
    AsyncLoop(grid, FedAsync(alpha=0.5), path, settings, poll_interval=0.01).run(record(START))
    assert all(pushed == pulled_before + 1 for _, pushed, pulled_before in grid.seen), grid.seen


@pytest.mark.parametrize("max_staleness, queued", [(1, False), (2, False), (3, True), (None, True)])
def test_prefetch_queues_no_task_that_max_staleness_would_drop(task_identity, max_staleness, queued):
    """Two nodes training at once, prefetch=1: a task queued behind a node's current one arrives
    about 2 x 2 - 1 = 3 versions stale (the other node's update during each task, and the node's
    current one); below strategy.max_staleness=3 such updates were dropped as too stale (the node's
    work wasted), so nothing is queued ahead: one task per node."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: FakeNode(1, 0.04, delay=0.08)}
    grid = QueueWatch(nodes)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, ())
    settings = AsyncLoopSettings(max_server_updates=6, eval_every=1, update_timeout=5.0, progress_timeout=30.0,
                                 prefetch=1)
    loop = AsyncLoop(grid, FedAsync(alpha=0.5, max_staleness=max_staleness), path, settings, poll_interval=0.01)
    loop.run(record(START))
    assert loop.prefetch == (1 if queued else 0) and loop.version == 6
    ahead = [pushed > pulled_before + 1 for _, pushed, pulled_before in grid.seen]
    assert any(ahead) == queued, grid.seen


@pytest.mark.parametrize("max_staleness, queued", [(1, False), (2, True)])
def test_a_buffered_strategy_counts_a_queued_tasks_staleness_in_its_versions(task_identity, max_staleness, queued):
    """FedBuff with a buffer of 2 on two nodes: the 3 updates that arrive before a queued task's
    make 2 versions, so max_staleness=2 keeps prefetch on (counted in updates, it was turned off)."""
    nodes = {101: FakeNode(0, 0.01, delay=0.02), 102: FakeNode(1, 0.02, delay=0.02)}
    loop, _ = make_loop(nodes, FedBuff(buffer_size=2, max_staleness=max_staleness), sent=DELTA,
                        max_server_updates=2, prefetch=1)
    loop.run(record(START))
    assert loop.prefetch == (1 if queued else 0)


def test_a_simulated_time_budget_is_not_overshot(task_identity):
    """async_loop.time_budget in virtual seconds: an update completing after the budget was still
    applied (3 server versions and 0.168 s for a 0.14 s budget, updates of 0.056 s each)."""
    fleet = make_fleet("homogeneous", 1, seed=0, jitter_sigma=0.0)
    duration = fleet.timing(0, 1, SENT.examples_per_update(LIMITS.train_examples[0]), 0).duration
    loop, _ = make_loop({101: FakeNode(0, 0.01)}, FedAsync(alpha=0.5), fleet=fleet, max_server_updates=None,
                        time_budget=2.5 * duration)
    loop.run(record(START))
    assert loop.version == 2 and loop.clock.now <= 2.5 * duration
    # The update that would end after the budget is reported unanswered (it was taken out of
    # flight, its real reply awaited, and then counted nowhere: a review)
    stats = loop.stats_dict()
    assert stats["client_updates"] == 2 and stats["unanswered_at_end"] == {p.simulated_node_name(0): 1}


@pytest.mark.parametrize("first", ["slow", "fast"])
def test_a_synchronous_round_lasts_as_long_as_its_slowest_reply_rejected_or_not(task_identity, first):
    """A slow node whose replies are rejected: the round waited for it, so its virtual time is the
    slow node's (it was the fast node's alone: sync looked faster than async under faults)."""
    fleet = make_fleet("mixed", 2, seed=0, jitter_sigma=0.0, latency=0.0, devices={
        "fast": {"share": 0.5, "speed": 4.0}, "slow": {"share": 0.5, "speed": 1.0}})
    slow = [d.name for d in fleet.profiles].index("slow")
    nodes = {101: FakeNode(0, 0.01, behave="nan" if slow == 0 else "honest"),
             102: FakeNode(1, 0.02, behave="nan" if slow == 1 else "honest")}
    if first == "fast":  # its reply first: the slow one is rejected before any identity is bound
        nodes = dict(reversed(list(nodes.items())))
    path = make_path(guard_max_harm=None)
    strategy = Guarded(FedAvg(fraction_evaluate=0.0), path, fleet=fleet)
    sync_round(strategy, nodes, START)
    work = SENT.examples_per_update(LIMITS.train_examples[slow])
    model_bytes = sum(v.nbytes for v in START.values())
    assert strategy.virtual_time == pytest.approx(fleet.timing(slow, 1, work, model_bytes).duration)


def test_a_synchronous_update_lost_to_the_fleet_is_never_read(task_identity, tmp_path):
    """Fleet dropout 0.5, seed 1: partition 0's first update is lost. Like the asynchronous loop,
    the server reads nothing of it: no hook, no loss trace, no length window, no example count;
    the round still waited the timeout for it. It fed all of these before (a review)."""
    fleet = make_fleet("homogeneous", 2, seed=1, dropout=0.5)
    assert fleet.timing(0, 1, 1, 0).dropped and not fleet.timing(1, 1, 1, 0).dropped  # the premise
    spy = Spy()
    recorder = RunRecorder(tmp_path, 1, 0.9, printer=lambda s: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [spy], recorder=recorder)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2, fraction_evaluate=0.0), path,
                       fleet=fleet, virtual_timeout=600.0)
    nodes = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}
    arrays, _ = sync_round(strategy, nodes, START)
    assert spy.updates == [(1, [1])]
    assert list(recorder.loss_points) == [p.simulated_node_name(1)]
    assert len(path.lengths.norms) == 1
    row = recorder.rows[1]
    assert row["num_updates"] == 1 and row["train_examples"] == nodes[12].n
    assert row["virtual_time"] == 600.0
    assert_weights(to_weights(arrays), shifted(START, 0.02))  # node 1's update alone


def test_a_run_ended_by_its_time_budget_checkpoints_its_last_version(task_identity, tmp_path):
    """time_budget 3.5 updates long, evaluated every 2 versions, checkpoint_every=5: version 3 is
    the last, evaluated at the end; its checkpoint was skipped (the end's 'last' asked whether
    the budget was spent, and the clock stops short of it), so a resume went back to version 0."""
    from flmnist.observers.checkpoint import load_checkpoint
    from flmnist.observers.recorder import RunRecorder

    fleet = make_fleet("homogeneous", 1, seed=0, jitter_sigma=0.0)
    duration = fleet.timing(0, 1, SENT.examples_per_update(LIMITS.train_examples[0]), 0).duration
    loop, _ = make_loop({101: FakeNode(0, 0.01)}, FedAsync(alpha=0.5), fleet=fleet, max_server_updates=None,
                        time_budget=3.5 * duration, eval_every=2)
    loop.path.recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    loop.path.checkpoint_every = 5
    loop.run(record(START))
    assert loop.version == 3
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 3


class Expired(FakeNode):
    """A node whose tasks Flower's SuperLink answers itself, as expired (ErrorCode.MESSAGE_UNAVAILABLE,
    src_node_id 1: the task outlived its time to live before the node took it)."""

    def answer_train(self, msg, behaviour):
        from flwr.app import Error
        from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

        reply = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="message expired"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply


def test_sync_counts_the_superlinks_error_replies_under_the_node_they_concern(task_identity):
    """Flower's SuperLink answers a message to an offline node itself (src_node_id 1): the round's
    failure was booked to "node id 1", a node that does not exist, for every offline board alike
    (a review). It counts under the node the message went to, and a node's own error reply under
    the name its node id is bound to (it was counted under "node id N", apart from its rejections)."""
    nodes = {101: FakeNode(0, 0.01), 102: Offline(1, 0.02), 103: FakeNode(2, 0.03, behave=lambda k: "honest" if k == 1
                                                                               else "error")}
    path = make_path(guard_max_harm=None)
    strategy = Guarded(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), path)
    SyncEngine(FakeGrid(nodes), strategy, path, SENT.to_record(), num_rounds=2, round_timeout=5.0).run(record(START))
    assert path.failed == {"node id 102": 2, "node 2": 1}, path.failed


def test_async_counts_an_expired_task_as_timed_out_not_as_the_nodes_failure(task_identity):
    """MESSAGE_UNAVAILABLE from the SuperLink (the task expired before the node took it) was screened
    as a failed reply of "node id 1"; it is the update timing out."""
    nodes = {101: FakeNode(0, 0.01, delay=0.05), 102: Expired(1, 0.02), 103: FakeNode(2, 0.03, delay=0.05)}
    loop, _ = make_loop(nodes, FedAsync(alpha=0.5), concurrency=3, max_server_updates=3)
    loop.run(record(START))
    assert loop.stats.counts["timed out"] >= 1 and "failed" not in loop.stats.counts, loop.stats.counts
    assert not loop.path.failed
