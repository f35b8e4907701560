"""Aggregation and server step of Flower's strategies behind flmnist's Guarded wrapper, on
real Flower messages; the summing of evaluation counts."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedProx

from flmnist.engine.guard import Guarded
from flmnist.engine.reply_path import ReplyPath
from flmnist.observers.base import Observer
from flmnist.protocol import messages as p
from flmnist.protocol.aggregation import aggregate_evaluate_counts
from flmnist.protocol.screen import NodeLimits, ReplyScreen, ScreenSettings
from flmnist.strategies import FedAvg

# Three partitions of 10 training examples; 2 local steps of batch 4 per update.
SENT = p.TrainSettings(model={"_target_": "flmnist.ml.models.LogReg"}, partition={"_target_": "iid"}, num_partitions=3,
                       seed=0, holdout_fraction=0.1, local_steps=2, batch_size=4)
LIMITS = NodeLimits(train_examples=(10, 10, 10), holdout_examples=(1, 1, 1))


class NodeList:
    """The one thing configure_train asks of a Grid: which nodes are connected."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def guarded(strategy, hooks=(), **kwargs) -> Guarded:
    return Guarded(strategy, ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, hooks), **kwargs)


def rec(**named):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in named.items()})


def arrays(w, b):
    return rec(w=np.array(w, dtype=np.float32), b=np.array(b, dtype=np.float32))


def reply(to: Message, arr: ArrayRecord | None, n, partition=1, **metrics) -> Message:
    """A train reply that keeps the contract (unless ``metrics`` or ``arr`` break it)."""
    values = {p.NUM_EXAMPLES: n, p.TRAIN_LOSS: 0.5, p.LOSS_TRACE: [0.6, 0.4], p.PARTITION_ID: partition,
              p.EXAMPLES_PROCESSED: SENT.examples_per_update(n) if isinstance(n, int) else 8, p.TRAIN_TIME: 0.1}
    values.update(metrics)
    content = RecordDict({p.METRICS: MetricRecord(values),
                          p.NODE_INFO: ConfigRecord({p.NODE_NAME: p.simulated_node_name(partition)})})
    if arr is not None:
        content[p.ARRAYS] = arr
    return Message(content=content, reply_to=to)


def configured(strategy, global_arrays, nodes=(11, 12, 13), server_round=1):
    return list(strategy.configure_train(server_round, global_arrays, ConfigRecord(), NodeList(list(nodes))))


def as_np(record):
    return {k: v.numpy() for k, v in record.items()}


@pytest.fixture
def start():
    return arrays([[0.0, 0.0]], [0.0])


def test_fedavg_is_the_example_weighted_average(task_identity, start):
    strategy = guarded(FedAvg(min_available_nodes=3))
    msgs = configured(strategy, start)
    replies = [
        reply(msgs[0], arrays([[1.0, 2.0]], [3.0]), 1, partition=0),
        reply(msgs[1], arrays([[4.0, 5.0]], [6.0]), 2, partition=1),
        reply(msgs[2], arrays([[7.0, 8.0]], [9.0]), 3, partition=2),
    ]
    out, metrics = strategy.aggregate_train(1, replies)
    # (1*1 + 2*4 + 3*7) / 6 = 5, (1*2 + 2*5 + 3*8) / 6 = 6, (1*3 + 2*6 + 3*9) / 6 = 7
    np.testing.assert_allclose(as_np(out)["w"], np.array([[5.0, 6.0]], np.float32), rtol=1e-6)
    np.testing.assert_allclose(as_np(out)["b"], np.array([7.0], np.float32), rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert metrics["num-examples"] == 6


def test_the_average_does_not_depend_on_the_order_replies_arrive_in(task_identity, start):
    """Guarded hands the inner strategy its updates sorted by partition: a reproducible sum."""
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        strategy = guarded(FedAvg(min_available_nodes=3))
        msgs = configured(strategy, start)
        rs = [reply(msgs[i], arrays([[0.1 * (i + 1), 0.3]], [0.7 / (i + 1)]), 3 + i, partition=i) for i in range(3)]
        outs.append(as_np(strategy.aggregate_train(1, [rs[i] for i in order])[0]))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_server_lr_one_momentum_zero_is_exactly_fedavg(task_identity, start):
    plain = guarded(FedAvg(min_available_nodes=2))
    stepped = guarded(FedAvg(min_available_nodes=2, server_learning_rate=1.0, server_momentum=0.0))
    results = []
    for strategy in (plain, stepped):
        msgs = configured(strategy, start, nodes=(1, 2))
        rs = [reply(msgs[0], arrays([[0.1, 0.7]], [0.3]), 3, partition=0),
              reply(msgs[1], arrays([[0.9, 0.2]], [0.6]), 7, partition=1)]
        results.append(as_np(strategy.aggregate_train(1, rs)[0]))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_server_learning_rate_and_momentum_step(task_identity, start):
    strategy = guarded(FedAvg(min_available_nodes=1, min_train_nodes=1, server_learning_rate=0.5, server_momentum=0.9))
    g = start
    expected_w, v = np.zeros((1, 2)), np.zeros((1, 2))
    for rnd, client in enumerate(([[2.0, 4.0]], [[6.0, 8.0]]), start=1):
        msgs = configured(strategy, g, nodes=(5,), server_round=rnd)
        g = strategy.aggregate_train(rnd, [reply(msgs[0], arrays(client, [0.0]), 4, partition=0)])[0]
        grad = expected_w - np.array(client)  # pseudo-gradient w_t - w_avg
        v = grad if rnd == 1 else 0.9 * v + grad
        expected_w = expected_w - 0.5 * v
        np.testing.assert_allclose(as_np(g)["w"], expected_w, rtol=1e-6)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (lambda m: reply(m, arrays([[np.nan, 1.0]], [0.0]), 5), "non-finite"),
        (lambda m: reply(m, arrays([[np.inf, 1.0]], [0.0]), 5), "non-finite"),
        (lambda m: reply(m, rec(w=np.zeros((2, 2), np.float32), b=np.zeros(1, np.float32)), 5),
         "declares float32 (2, 2), expected float32 (1, 2)"),
        (lambda m: reply(m, rec(w=np.zeros((1, 2), np.float64), b=np.zeros(1, np.float32)), 5), "declares float64"),
        (lambda m: reply(m, rec(w=np.zeros((1, 2), np.float32)), 5), "do not match the model"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), 0), "num-examples 0 is outside 1..10"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), -4), "num-examples -4 is outside 1..10"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), 2.5), "'num-examples' must be an integer"),
        (lambda m: Message(RecordDict({"arrays": arrays([[1.0, 1.0]], [0.0]), "metrics": MetricRecord({"x": 1}),
                                       "node-info": ConfigRecord({"node-name": "x"})}), reply_to=m),
         "missing ['examples-processed', 'loss-trace', 'num-examples'"),
        (lambda m: reply(m, None, 5), "array records [], expected ['arrays']"),
    ],
)
def test_bad_reply_is_rejected_and_never_averaged(task_identity, start, caplog, bad, reason):
    strategy = guarded(FedAvg(min_available_nodes=2))
    msgs = configured(strategy, start, nodes=(21, 22))
    good = reply(msgs[0], arrays([[2.0, 4.0]], [6.0]), 10, partition=0)
    with caplog.at_level("WARNING", logger="flwr"):
        out, _ = strategy.aggregate_train(1, [good, bad(msgs[1])])
    np.testing.assert_array_equal(as_np(out)["w"], np.array([[2.0, 4.0]], np.float32))
    assert f"node id {msgs[1].metadata.dst_node_id}" in caplog.text and reason in caplog.text
    assert sum(strategy.path.rejected.values()) == 1


def test_only_bad_replies_leave_the_model_unchanged(task_identity, start):
    strategy = guarded(FedAvg(min_available_nodes=1, min_train_nodes=1))
    msgs = configured(strategy, start, nodes=(3,))
    out, _ = strategy.aggregate_train(1, [reply(msgs[0], arrays([[np.nan, 0.0]], [0.0]), 3, partition=0)])
    assert out is None  # Flower keeps the previous global model
    assert strategy.failed_rounds == 1


def test_error_replies_do_not_stop_aggregation(task_identity, start, caplog):
    strategy = guarded(FedAvg(min_available_nodes=2))
    msgs = configured(strategy, start, nodes=(1, 42))
    failed = Message(Error(code=1, reason="node crashed"), reply_to=msgs[1])
    with caplog.at_level("WARNING", logger="flwr"):
        out, _ = strategy.aggregate_train(1, [reply(msgs[0], arrays([[1.0, 1.0]], [1.0]), 2, partition=0), failed])
    np.testing.assert_array_equal(as_np(out)["b"], np.array([1.0], np.float32))
    node = msgs[1].metadata.dst_node_id
    assert f"Update from node id {node} failed: node crashed" in caplog.text
    assert strategy.path.failed == {f"node id {node}": 1}


def test_hooks_see_validated_updates_with_node_names(task_identity, start):
    seen = []

    class Spy(Observer):
        def evaluate_updates(self, server_round, updates):
            seen.extend((server_round, u.name) for u in updates)

    strategy = guarded(FedProx(min_available_nodes=2, proximal_mu=0.1), hooks=[Spy()])
    msgs = configured(strategy, start, nodes=(1, 2), server_round=4)
    assert msgs[0].content["config"]["proximal-mu"] == 0.1
    strategy.aggregate_train(4, [
        reply(msgs[0], arrays([[1.0, 1.0]], [1.0]), 2, partition=0),
        reply(msgs[1], arrays([[np.nan, 1.0]], [1.0]), 2, partition=1),
    ])
    assert seen == [(4, "node 0")]


def test_per_digit_counts_are_summed_not_averaged(task_identity):
    # node A holds only digit 0 (90/100 correct), node B only digit 1 (10/10 correct)
    a = {"num-examples": 100, "loss-sum": 20.0, "correct": 90, "correct-0": 90, "total-0": 100}
    b = {"num-examples": 10, "loss-sum": 1.0, "correct": 10, "correct-1": 10, "total-1": 10}
    for d in range(2, 10):
        a[f"correct-{d}"] = a[f"total-{d}"] = b[f"correct-{d}"] = b[f"total-{d}"] = 0
    a["correct-1"] = a["total-1"] = b["correct-0"] = b["total-0"] = 0
    out = aggregate_evaluate_counts([RecordDict({"m": MetricRecord(a)}), RecordDict({"m": MetricRecord(b)})], "num-examples")
    assert out["accuracy"] == pytest.approx(100 / 110)
    assert out["loss"] == pytest.approx(21 / 110)
    assert out["accuracy-0"] == pytest.approx(0.9) and out["accuracy-1"] == pytest.approx(1.0)
    assert "accuracy-5" not in out  # no node holds a 5: no accuracy to report
