"""Aggregation, server step and reply validation of flmnist's strategies, on real Flower messages."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flmnist.aggregation import aggregate_evaluate_counts
from flmnist.evaluation import EvaluationHook
from flmnist.strategies import FedAvg, FedProx


class NodeList:
    """The one thing configure_train asks of a Grid: which nodes are connected."""

    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def rec(**named):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in named.items()})


def arrays(w, b):
    return rec(w=np.array(w, dtype=np.float32), b=np.array(b, dtype=np.float32))


def reply(to: Message, arr: ArrayRecord | None, n, **metrics) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": n, "train-loss": 0.5, **metrics})})
    if arr is not None:
        content["arrays"] = arr
    return Message(content=content, reply_to=to)


def configured(strategy, global_arrays, nodes=(11, 12, 13)):
    return list(strategy.configure_train(1, global_arrays, ConfigRecord(), NodeList(list(nodes))))


def as_np(record):
    return {k: v.numpy() for k, v in record.items()}


@pytest.fixture
def start():
    return arrays([[0.0, 0.0]], [0.0])


def test_fedavg_is_the_example_weighted_average(task_identity, start):
    strategy = FedAvg(min_available_nodes=3)
    msgs = configured(strategy, start)
    replies = [
        reply(msgs[0], arrays([[1.0, 2.0]], [3.0]), 1),
        reply(msgs[1], arrays([[4.0, 5.0]], [6.0]), 2),
        reply(msgs[2], arrays([[7.0, 8.0]], [9.0]), 3),
    ]
    out, metrics = strategy.aggregate_train(1, replies)
    # (1*1 + 2*4 + 3*7) / 6 = 5, (1*2 + 2*5 + 3*8) / 6 = 6, (1*3 + 2*6 + 3*9) / 6 = 7
    np.testing.assert_allclose(as_np(out)["w"], np.array([[5.0, 6.0]], np.float32), rtol=1e-6)
    np.testing.assert_allclose(as_np(out)["b"], np.array([7.0], np.float32), rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(0.5)


def test_server_lr_one_momentum_zero_is_exactly_fedavg(task_identity, start):
    plain, stepped = FedAvg(min_available_nodes=2), FedAvg(min_available_nodes=2, server_learning_rate=1.0, server_momentum=0.0)
    results = []
    for strategy in (plain, stepped):
        msgs = configured(strategy, start, nodes=(1, 2))
        rs = [reply(msgs[0], arrays([[0.1, 0.7]], [0.3]), 3), reply(msgs[1], arrays([[0.9, 0.2]], [0.6]), 7)]
        results.append(as_np(strategy.aggregate_train(1, rs)[0]))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_server_learning_rate_and_momentum_step(task_identity, start):
    strategy = FedAvg(min_available_nodes=1, server_learning_rate=0.5, server_momentum=0.9)
    g = start
    expected_w, v = np.zeros((1, 2)), np.zeros((1, 2))
    for rnd, client in enumerate(([[2.0, 4.0]], [[6.0, 8.0]]), start=1):
        msgs = list(strategy.configure_train(rnd, g, ConfigRecord(), NodeList([5])))
        g = strategy.aggregate_train(rnd, [reply(msgs[0], arrays(client, [0.0]), 4)])[0]
        grad = expected_w - np.array(client)  # pseudo-gradient w_t - w_avg
        v = grad if rnd == 1 else 0.9 * v + grad
        expected_w = expected_w - 0.5 * v
        np.testing.assert_allclose(as_np(g)["w"], expected_w, rtol=1e-6)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (lambda m: reply(m, arrays([[np.nan, 1.0]], [0.0]), 5), "non-finite"),
        (lambda m: reply(m, arrays([[np.inf, 1.0]], [0.0]), 5), "non-finite"),
        (lambda m: reply(m, rec(w=np.zeros((2, 2), np.float32), b=np.zeros(1, np.float32)), 5), "shape"),
        (lambda m: reply(m, rec(w=np.zeros((1, 2), np.float64), b=np.zeros(1, np.float32)), 5), "dtype"),
        (lambda m: reply(m, rec(w=np.zeros((1, 2), np.float32)), 5), "do not match the model"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), 0), "positive integer"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), -4), "positive integer"),
        (lambda m: reply(m, arrays([[1.0, 1.0]], [0.0]), 2.5), "positive integer"),
        (lambda m: Message(RecordDict({"arrays": arrays([[1.0, 1.0]], [0.0]), "metrics": MetricRecord({"x": 1})}), reply_to=m), "missing 'num-examples'"),
        (lambda m: reply(m, None, 5), "expected one ArrayRecord"),
    ],
)
def test_bad_reply_is_rejected_and_never_averaged(task_identity, start, caplog, bad, reason):
    strategy = FedAvg(min_available_nodes=2)
    msgs = configured(strategy, start, nodes=(21, 22))
    good = reply(msgs[0], arrays([[2.0, 4.0]], [6.0]), 10, **{"partition-id": 0})
    with caplog.at_level("WARNING", logger="flwr"):
        out, _ = strategy.aggregate_train(1, [good, bad(msgs[1])])
    np.testing.assert_array_equal(as_np(out)["w"], np.array([[2.0, 4.0]], np.float32))
    assert f"node {msgs[1].metadata.dst_node_id}" in caplog.text and reason in caplog.text


def test_only_bad_replies_leave_the_model_unchanged(task_identity, start):
    strategy = FedAvg(min_available_nodes=1)
    msgs = configured(strategy, start, nodes=(3,))
    out, _ = strategy.aggregate_train(1, [reply(msgs[0], arrays([[np.nan, 0.0]], [0.0]), 3)])
    assert out is None  # Flower keeps the previous global model


def test_error_replies_do_not_stop_aggregation(task_identity, start):
    strategy = FedAvg(min_available_nodes=2)
    msgs = configured(strategy, start, nodes=(1, 2))
    failed = Message(Error(code=1, reason="node crashed"), reply_to=msgs[1])
    out, _ = strategy.aggregate_train(1, [reply(msgs[0], arrays([[1.0, 1.0]], [1.0]), 2), failed])
    np.testing.assert_array_equal(as_np(out)["b"], np.array([1.0], np.float32))


def test_hooks_see_validated_updates_with_node_names(task_identity, start):
    seen = []

    class Spy(EvaluationHook):
        def evaluate_updates(self, server_round, updates):
            seen.extend((server_round, u.name) for u in updates)

    strategy = FedProx(min_available_nodes=2, proximal_mu=0.1, hooks=[Spy()])
    msgs = configured(strategy, start, nodes=(1, 2))
    assert msgs[0].content["config"]["proximal-mu"] == 0.1
    strategy.aggregate_train(4, [
        reply(msgs[0], arrays([[1.0, 1.0]], [1.0]), 2, **{"partition-id": 0}),
        reply(msgs[1], arrays([[np.nan, 1.0]], [1.0]), 2, **{"partition-id": 1}),
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


def test_error_replies_are_named_by_node_id(task_identity, start):
    from flmnist.strategies.base import node_name

    msgs = configured(FedAvg(min_available_nodes=1), start, nodes=(42,))
    assert node_name(Message(Error(code=1, reason="node unavailable"), reply_to=msgs[0])) == "node 42"
