"""Asynchronous strategies: staleness functions, equivalences (each stating its conditions),
max_staleness, virtual-clock ordering and fleet determinism."""

import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flmnist.core.errors import ConfigError
from flmnist.engine.async_jobs import Job, VirtualQueue
from flmnist.engine.fleet import make_fleet
from flmnist.engine.guard import Guarded
from flmnist.engine.reply_path import ReplyPath
from flmnist.ml.data import load_mnist
from flmnist.ml.models import LogReg
from flmnist.ml.training import train
from flmnist.protocol import messages as p
from flmnist.protocol.screen import NodeLimits, ReplyScreen, ScreenSettings
from flmnist.protocol.settings import AsyncLoopSettings
from flmnist.strategies import FedAsync, FedAvg, FedBuff
from flmnist.strategies.staleness import Constant, Hinge, InverseSqrt, Polynomial


def guarded_fedavg(sent: p.TrainSettings, num_nodes: int, fleet=None) -> Guarded:
    """Flower's FedAvg behind flmnist's reply screen; every partition holds 100 examples."""
    limits = NodeLimits(train_examples=(100,) * num_nodes, holdout_examples=(10,) * num_nodes)
    path = ReplyPath(ReplyScreen(ScreenSettings(), limits), sent)
    return Guarded(FedAvg(min_available_nodes=num_nodes, min_train_nodes=num_nodes), path, fleet=fleet)


def train_reply(to: Message, arrays: ArrayRecord, n: int, partition: int, sent: p.TrainSettings) -> Message:
    """An honest train reply (protocol.TRAIN_METRICS exactly, and a node-info record)."""
    metrics = MetricRecord({p.NUM_EXAMPLES: n, p.TRAIN_LOSS: 0.1, p.LOSS_TRACE: [0.1], p.PARTITION_ID: partition,
                            p.EXAMPLES_PROCESSED: sent.examples_per_update(n), p.TRAIN_TIME: 0.0})
    info = ConfigRecord({p.NODE_NAME: p.simulated_node_name(partition)})
    return Message(RecordDict({p.ARRAYS: arrays, p.METRICS: metrics, p.NODE_INFO: info}), reply_to=to)


SENT = p.TrainSettings(model={"_target_": "flmnist.ml.models.LogReg"}, partition={"_target_": "iid"}, num_partitions=3,
                       seed=0, holdout_fraction=0.1, local_steps=1, batch_size=10)


def weights(seed, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=shape).astype(np.float32), "b": rng.normal(size=shape[:1]).astype(np.float32)}


def test_staleness_functions_match_their_formulas():
    for tau in range(30):
        assert Constant()(tau) == 1.0
        assert Polynomial(0.5)(tau) == pytest.approx((tau + 1) ** -0.5)
        assert Hinge(10, 4)(tau) == pytest.approx(1.0 if tau <= 4 else 1 / (10 * (tau - 4) + 1))
        assert InverseSqrt()(tau) == pytest.approx(1 / math.sqrt(1 + tau))
    assert Hinge(10, 4)(4) == 1.0 and Hinge(10, 4)(5) == pytest.approx(1 / 11)


def test_fedasync_mixes_with_alpha_times_staleness_weight():
    model, new = weights(0), weights(1)
    out = FedAsync(alpha=0.6, staleness=Polynomial(0.5)).apply(model, new, 10, staleness=3)
    a = 0.6 * 4 ** -0.5
    np.testing.assert_allclose(out["w"], (1 - a) * model["w"] + a * new["w"], rtol=1e-6)


def test_fedasync_alpha_one_constant_staleness_one_node_is_sequential_training(mnist_root):
    """Conditions: alpha = 1, s = constant, a single node: each update replaces the model."""
    x, y = load_mnist(str(mnist_root), True)
    x, y = x[:500], y[:500]
    strategy = FedAsync(alpha=1.0, staleness=Constant())

    def local(state, k):
        model = LogReg()
        model.load_state_dict({n: torch.from_numpy(v.copy()) for n, v in state.items()})
        train(model, x, y, batch_size=25, lr=0.1, steps=5, generator=torch.Generator().manual_seed(k))
        return {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}

    torch.manual_seed(0)
    start = {n: t.numpy().copy() for n, t in LogReg().state_dict().items()}
    global_w, sequential = start, start
    for k in range(4):
        global_w = strategy.apply(global_w, local(global_w, k), 500, staleness=0)
        sequential = local(sequential, k)
    for n in start:
        np.testing.assert_array_equal(global_w[n], sequential[n])


def test_fedbuff_full_buffer_no_delay_unit_lr_equals_a_fedavg_round(task_identity):
    """Conditions: K = number of nodes, all dispatched on the same model (staleness 0),
    eta_g = 1, no momentum, deltas weighted by examples: one FedBuff step = one round of
    Flower's FedAvg behind flmnist's guard (screened replies)."""
    model = weights(0)
    clients = [weights(s) for s in (1, 2, 3)]
    examples = [30, 10, 60]
    buff = FedBuff(buffer_size=3, server_learning_rate=1.0)
    outs = [buff.apply(model, {k: c[k] - model[k] for k in model}, n, staleness=0) for c, n in zip(clients, examples)]
    assert outs[0] is None and outs[1] is None

    fedavg = guarded_fedavg(SENT, 3)
    record = ArrayRecord({k: Array(v) for k, v in model.items()})

    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3]

    msgs = list(fedavg.configure_train(1, record, ConfigRecord(), Nodes()))
    replies = [
        train_reply(m, ArrayRecord({k: Array(v) for k, v in c.items()}), n, i, SENT)
        for i, (c, n, m) in enumerate(zip(clients, examples, msgs))
    ]
    avg, _ = fedavg.aggregate_train(1, replies)
    for k in model:
        np.testing.assert_allclose(outs[2][k], avg[k].numpy(), rtol=1e-5, atol=1e-6)


def test_fedbuff_buffer_of_one_equals_fedasync_with_matching_mixing_weight():
    """Conditions: K = 1 and FedAsync's alpha = eta_g with the same staleness function:
    x + eta s(tau) (x_k - x) = (1 - eta s(tau)) x + eta s(tau) x_k."""
    model, new = weights(0), weights(5)
    for tau in (0, 1, 4, 9):
        buff = FedBuff(buffer_size=1, server_learning_rate=0.7, staleness=InverseSqrt())
        fa = FedAsync(alpha=0.7, staleness=InverseSqrt())
        a = buff.apply(model, {k: new[k] - model[k] for k in model}, 123, staleness=tau)
        b = fa.apply(model, new, 123, staleness=tau)
        for k in model:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_fedbuff_server_momentum():
    model, d1, d2 = weights(0), weights(1), weights(2)
    buff = FedBuff(buffer_size=1, server_learning_rate=0.5, server_momentum=0.9, staleness=Constant())
    m1 = buff.apply(model, d1, 1, 0)
    m2 = buff.apply(m1, d2, 1, 0)
    v2 = {k: 0.9 * d1[k] + d2[k] for k in model}
    np.testing.assert_allclose(m2["w"], model["w"] + 0.5 * d1["w"] + 0.5 * v2["w"], rtol=1e-5)


def test_buffer_never_exceeds_concurrency(caplog):
    buff = FedBuff(buffer_size=10)
    with caplog.at_level(logging.INFO, logger="flwr"):
        buff.limit_concurrency(4)
    assert buff.buffer_size == 4
    assert ("FedBuff: strategy.buffer_size=10 is more than the 4 nodes training at once (async_loop.concurrency, else "
            "the nodes found): each server step averages 4 updates") in caplog.text  # (it was lowered silently)
    # resumed with all 10 nodes up (it had started with 4): K is the configured 10 again, not the
    # checkpoint's 4 (a deployment that started with few boards kept the small buffer for good)
    resumed = FedBuff(buffer_size=10)
    resumed.load_state_dict(buff.state_dict())
    resumed.limit_concurrency(10)
    assert resumed.buffer_size == 10


def test_max_staleness_drops_only_older_updates():
    s = FedAsync(max_staleness=3)
    assert [s.accepts(t) for t in range(6)] == [True, True, True, True, False, False]
    assert all(FedBuff().accepts(t) for t in range(100))


@pytest.mark.parametrize("make, message", [
    (lambda: FedAsync(alpha=0), r"strategy.alpha must be a finite number in \(0, 1\]"),
    (lambda: FedAsync(alpha=1.5), r"strategy.alpha must be a finite number in \(0, 1\]"),
    (lambda: FedBuff(buffer_size=0), "strategy.buffer_size must be an integer >= 1"),
    (lambda: FedBuff(max_staleness=-1), "strategy.max_staleness must be an integer >= 0"),
    (lambda: make_fleet("quantum", 3, 0), "fleet.kind 'quantum' is unknown"),
    (lambda: AsyncLoopSettings(update_timeout=0), "async_loop.update_timeout must be a finite number > 0"),
    (lambda: AsyncLoopSettings(max_consecutive_failures=0), "async_loop.max_consecutive_failures must be an integer"),
    (lambda: AsyncLoopSettings(progress_timeout=float("inf")), "async_loop.progress_timeout must be a finite"),
    (lambda: AsyncLoopSettings(max_server_updates=None), "async_loop needs a stop"),
])
def test_invalid_async_settings(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_virtual_queue_releases_in_virtual_order_whatever_the_push_order():
    jobs = [Job(vdone=t, seq=i, node_id=i, message_id=str(i), version=0, sent=0.0)
            for i, t in enumerate([5.0, 1.5, 3.2, 1.5, 0.1])]
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        queue = VirtualQueue()
        for i in order:
            queue.push(jobs[i])
        released = [queue.pop().node_id for _ in range(len(jobs))]
        assert released == [4, 1, 3, 2, 0]  # ties broken by dispatch order


def test_fleet_timings_are_deterministic_and_follow_speed():
    a, b = make_fleet("lognormal", 8, seed=3, sigma=1.0), make_fleet("lognormal", 8, seed=3, sigma=1.0)
    ta = [a.timing(n, k, 640, 1_700_000) for n in range(8) for k in range(5)]
    tb = [b.timing(n, k, 640, 1_700_000) for n in range(8) for k in range(5)]
    assert ta == tb
    fleet = make_fleet("mixed", 10, seed=0, jitter_sigma=0.0, devices={
        "slow": {"share": 0.5, "speed": 1.0}, "fast": {"share": 0.5, "speed": 10.0}})
    names = [p.name for p in fleet.profiles]
    assert names.count("slow") == 5 and names.count("fast") == 5
    slow = fleet.timing(names.index("slow"), 1, 4000, 0).duration
    fast = fleet.timing(names.index("fast"), 1, 4000, 0).duration
    assert slow == pytest.approx(4000 / 500 + 2 * 0.02)  # examples / (base * speed) + 2 latencies
    assert fast == pytest.approx(4000 / 5000 + 2 * 0.02)


def test_dropout_probability_is_respected():
    fleet = make_fleet("homogeneous", 4, seed=1, dropout=0.25)
    dropped = [fleet.timing(n, k, 100, 0).dropped for n in range(4) for k in range(500)]
    assert 0.2 < np.mean(dropped) < 0.3


def test_sync_fedavg_advances_virtual_time_by_its_slowest_node(task_identity):
    fleet = make_fleet("mixed", 2, seed=0, jitter_sigma=0.0, latency=0.0, devices={
        "slow": {"share": 0.5, "speed": 1.0, "latency": 0.0}, "fast": {"share": 0.5, "speed": 4.0, "latency": 0.0}})
    # 10 local epochs of each partition's 100 examples: 1000 examples processed per update.
    sent = p.TrainSettings(model={}, partition={}, num_partitions=2, seed=0, holdout_fraction=0.1, local_epochs=10)
    record = ArrayRecord({k: Array(v) for k, v in weights(0).items()})
    model_bytes = sum(v.nbytes for v in weights(0).values())
    expected = max(fleet.timing(p, 1, 1000, model_bytes).duration for p in (0, 1))

    class Nodes:
        def get_node_ids(self):
            return [1, 2]

    # Nodes claiming 1 example each (their updates then weigh less, and that is all): the round is
    # still timed by the 100 the server knows each holds (a claim of 1 made the round 100x shorter).
    for claimed in (100, 1):
        strategy = guarded_fedavg(sent, 2, fleet=fleet)
        msgs = list(strategy.configure_train(1, record, ConfigRecord(), Nodes()))
        replies = [train_reply(m, record, claimed, partition, sent) for partition, m in zip((0, 1), msgs)]
        strategy.aggregate_train(1, replies)
        assert strategy.virtual_time == pytest.approx(expected)
