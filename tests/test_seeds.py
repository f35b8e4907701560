"""The seed presets (conf/experiment/seed000|001|003) and what they rest on.

- each preset composes (Hydra) with its seed's settings;
- seed 000's ``Test set:`` line (``eval.style=seed000``) and the unchanged default lines;
- seed 001's plain averaging: the screen's ``unit-weight`` and Flower's ``weighted_by_key``;
- seed 003's MLP and its FedSGD step, which is one ``torch.optim.Adam`` step on the averaged
  gradient, while Flower 1.41's FedAdam under the same conditions is not.

Nothing here starts Flower: strategies get real Flower Messages and ArrayRecords directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam
from test_engines import START, FakeNode, make_path, shifted, sync_round

from flmnist.config.compose import compose_config
from flmnist.core.arrays import to_weights
from flmnist.core.errors import ConfigError
from flmnist.engine.guard import Guarded
from flmnist.ml.data import load_mnist
from flmnist.ml.models import MLP, LeNet, LogReg, count_parameters, model_from_spec
from flmnist.ml.training import EvalResult, train
from flmnist.observers.evaluation import DigitEvaluation, seed_lines
from flmnist.protocol import messages as p
from flmnist.strategies import FedAvg, FedSGD, build_strategy

# ============================================================ presets


def test_seed000_preset_matches_the_seed():
    cfg = compose_config(["experiment=seed000"])
    assert (cfg.name, cfg.num_nodes, cfg.num_rounds) == ("seed000", 4, 10)
    assert compose_config([]).partition == cfg.partition  # the default IID split
    model = model_from_spec(dict(cfg.model))
    assert isinstance(model, LeNet) and count_parameters(model) == 431_080
    assert [tuple(m.weight.shape) for m in (model.conv1, model.conv2, model.fc1, model.fc2)] == [
        (20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)]  # the seed's Net
    c = cfg.client
    assert (c.local_epochs, c.local_steps, c.batch_size, c.lr, c.momentum) == (1, None, 64, 0.01, 0.0)
    assert cfg.eval.every == 1 and cfg.eval.style == "seed000"
    assert cfg.sampling.fraction_evaluate == 0.0 and cfg.data.holdout_fraction == 0.0


def test_seed001_preset_matches_the_seed():
    cfg = compose_config(["experiment=seed001"])
    assert (cfg.name, cfg.num_nodes) == ("seed001", 2)
    assert isinstance(model_from_spec(dict(cfg.model)), LogReg)
    c = cfg.client
    assert (c.local_epochs, c.local_steps, c.batch_size, c.lr, c.momentum) == (5, None, 64, 0.01, 0.0)
    strategy = build_strategy(cfg.strategy)
    assert type(strategy) is FedAvg and strategy.weighted_by_key == p.UNIT_WEIGHT
    assert (strategy.server_learning_rate, strategy.server_momentum) == (1.0, 0.0)  # no server step


def test_seed003_preset_matches_the_seed():
    cfg = compose_config(["experiment=seed003"])
    assert (cfg.name, cfg.num_nodes) == ("seed003", 100)
    c = cfg.client
    assert (c.local_steps, c.batch_size, c.lr, c.momentum, c.weight_decay) == (1, 32, 1.0, 0.0, 0.0)
    # one pass over a node's 600 examples is ceil(600 / 32) = 19 steps; the seed makes 101 passes
    assert cfg.eval.every == 19 and cfg.num_rounds == 101 * 19 and cfg.data.holdout_fraction == 0.0
    assert 60_000 // cfg.num_nodes == 600 and -(-600 // c.batch_size) == 19
    strategy = build_strategy(cfg.strategy)
    assert type(strategy) is FedSGD
    assert (strategy.eta, strategy.eta_l, strategy.beta_1, strategy.beta_2, strategy.tau) == (1e-4, 1.0, 0.9, 0.999, 1e-8)
    model = model_from_spec(dict(cfg.model))
    assert count_parameters(model) == 278_410  # as conf/model/mlp_seed003.yaml says
    assert [tuple(m.weight.shape) for m in (model.fc1, model.fc2, model.fc3)] == [(128, 784), (1280, 128), (10, 1280)]
    assert model.dropout.p == 0.2


def test_mlp_defaults_are_still_the_2nn():
    model = MLP()
    assert count_parameters(model) == 199_210 and model.dropout.p == 0.0
    assert list(model.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


# ============================================================ seed 000's line


def _result(correct: int, total: int = 10_000, loss: float = 0.04217) -> EvalResult:
    result = EvalResult(loss_sum=loss * total)
    result.confusion[0, 0] = correct
    result.confusion[0, 1] = total - correct
    return result


def test_seed000_style_prints_the_seeds_test_set_line_and_the_default_is_unchanged():
    result = _result(9863)
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert seed_lines("Federated model", result, groups, "seed000") == [
        "Test set: Average loss: 0.0422, Accuracy: 9863/10000 (99%)"]
    assert seed_lines("Federated model", result, groups) == [
        "Federated model: Percentage numbers 0-3: 100%, 4-6: 0%, 7-9: 0%",
        "Federated model: Average loss: 0.0422, Accuracy: 9863/10000 (98.63%)"]


@pytest.mark.parametrize("style, expected", [
    ("seed000", [r"Test set: Average loss: \d+\.\d{4}, Accuracy: \d+/100 \(\d+%\)"]),
    ("seed002", [r"Federated model: Percentage numbers 0-3: \d+%, 4-6: \d+%, 7-9: \d+%",
                 r"Federated model: Average loss: \d+\.\d{4}, Accuracy: \d+/100 \(\d+\.\d\d%\)"]),
])
def test_digit_evaluation_prints_the_configured_style(style, expected):
    import re

    torch.manual_seed(0)
    lines: list[str] = []
    hook = DigitEvaluation(torch.randn(100, 1, 28, 28), torch.arange(100) % 10, LogReg, num_rounds=2,
                           printer=lines.append, style=style)
    hook.evaluate_global(1, ArrayRecord(LogReg().state_dict()))
    assert len(lines) == len(expected)
    assert all(re.fullmatch(e, line) for e, line in zip(expected, lines)), lines


def test_unknown_eval_style_names_the_valid_ones():
    with pytest.raises(ConfigError, match="eval.style must be one of seed002, seed000, got 'seed9'"):
        DigitEvaluation(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), LogReg, 1, style="seed9")


# ============================================================ seed 001: plain averaging


def test_unit_weight_averages_plainly_where_num_examples_weights(task_identity):
    """Conditions: two screened FakeNodes holding 10 and 20 examples, models shifted by 0.01
    and 0.03. seed001's strategy (weighted_by_key=unit-weight) gives the plain mean shift 0.02;
    the default FedAvg (num-examples) gives (10 * 0.01 + 20 * 0.03) / 30."""
    nodes = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.03)}
    plain = build_strategy(compose_config(["experiment=seed001"]).strategy)
    arrays, metrics = sync_round(Guarded(plain, make_path()), nodes, START)
    for k, v in shifted(START, 0.02).items():
        np.testing.assert_allclose(to_weights(arrays)[k], v, rtol=0, atol=1e-6)
    assert metrics[p.UNIT_WEIGHT] == 2  # two updates, one vote each
    weighted, _ = sync_round(Guarded(FedAvg(min_available_nodes=2), make_path()), nodes, START)
    for k, v in shifted(START, (10 * 0.01 + 20 * 0.03) / 30).items():
        np.testing.assert_allclose(to_weights(weighted)[k], v, rtol=0, atol=1e-6)
        assert not np.allclose(to_weights(weighted)[k], to_weights(arrays)[k], rtol=0, atol=1e-4)


def test_the_screen_gives_every_accepted_update_unit_weight_and_nodes_may_not_send_it(task_identity):
    nodes = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.03)}
    path = make_path()
    seen = []

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen.extend(dict(next(iter(r.content.metric_records.values()))) for r in replies)
            return super().aggregate_train(server_round, replies)

    sync_round(Guarded(Spy(min_available_nodes=2), path), nodes, START)
    assert [m[p.UNIT_WEIGHT] for m in seen] == [1, 1]
    assert set(seen[0]) == set(p.TRAIN_METRICS) | {p.UNIT_WEIGHT}
    # a node sending it breaks the contract: its reply is rejected, the round averages the other
    class Voter(FakeNode):
        def answer_train(self, msg, behaviour):
            reply = super().answer_train(msg, behaviour)
            reply.content[p.METRICS][p.UNIT_WEIGHT] = 1000  # a thousand votes, claimed
            return reply

    path = make_path()
    arrays, _ = sync_round(Guarded(FedAvg(min_available_nodes=2, weighted_by_key=p.UNIT_WEIGHT), path),
                           {11: FakeNode(0, 0.01), 12: Voter(1, 0.5)}, START)
    stats = path.stats()
    assert stats["rejected_per_node"] == {"node 1": 1}, stats
    assert stats["rejection_reasons"] == {"metric keys differ from the contract": 1}, stats
    for k, v in shifted(START, 0.01).items():  # node 0's update alone
        np.testing.assert_allclose(to_weights(arrays)[k], v, rtol=0, atol=1e-6)


# ============================================================ seed 003: FedSGD = Adam


class NodeGrid:
    """Just enough Grid for ``configure_train``: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return self.node_ids


def _seeds(node: int, server_round: int) -> tuple[int, int]:
    return 1000 * server_round + node, 7 + 1000 * server_round + node  # batch draw, dropout


def _node_reply(msg: Message, images, labels, node: int, server_round: int) -> Message:
    """What flmnist's ClientApp does, in process: one SGD step (lr, momentum from the message)
    on one batch of this node's examples, reply with the model and the contract's metrics."""
    sent = p.TrainSettings.from_record(msg.content[p.CONFIG])
    model = model_from_spec(sent.model)
    model.load_state_dict(msg.content[p.ARRAYS].to_torch_state_dict())
    batch_seed, dropout_seed = _seeds(node, server_round)
    torch.manual_seed(dropout_seed)
    loss, trace = train(model, images, labels, batch_size=sent.batch_size, lr=sent.lr, momentum=sent.momentum,
                        steps=sent.local_steps, generator=torch.Generator().manual_seed(batch_seed),
                        dev=torch.device("cpu"))
    metrics = MetricRecord({p.NUM_EXAMPLES: len(labels), p.TRAIN_LOSS: loss, p.LOSS_TRACE: trace,
                            p.PARTITION_ID: node, p.EXAMPLES_PROCESSED: sent.batch_size, p.TRAIN_TIME: 0.0,
                            p.UNIT_WEIGHT: 1})
    return Message(RecordDict({p.ARRAYS: ArrayRecord(model.state_dict()), p.METRICS: metrics}), reply_to=msg)


def _centralized_gradient(model: torch.nn.Module, images, labels, node: int, server_round: int, batch: int):
    """The same batch and dropout mask the node used, its mean-loss gradient on the central model."""
    batch_seed, dropout_seed = _seeds(node, server_round)
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(batch_seed))[:batch]
    torch.manual_seed(dropout_seed)
    model.train()
    model.zero_grad(set_to_none=True)
    F.nll_loss(model(images[idx]), labels[idx]).backward()
    return [prm.grad.detach().clone() for prm in model.parameters()]


def _federated_vs_adam(strategy, mnist_root, num_nodes: int, rounds: int, betas=(0.9, 0.999), eps=1e-8):
    """Run ``rounds`` FedSGD rounds of seed 003 (MLP, batch 32, client lr 1, one step) through
    ``strategy.configure_train``/``aggregate_train`` and, beside it, torch.optim.Adam (lr 1e-4)
    on the mean of the same gradients. Returns the (federated, centralized) state dicts per round."""
    cfg = compose_config(["experiment=seed003", f"num_nodes={num_nodes}"])
    sent = p.TrainSettings.from_config(cfg)
    images, labels = load_mnist(str(mnist_root), True)
    parts = [(images[600 * k: 600 * (k + 1)], labels[600 * k: 600 * (k + 1)]) for k in range(num_nodes)]
    torch.manual_seed(3)
    central = model_from_spec(dict(cfg.model))
    adam = torch.optim.Adam(central.parameters(), lr=1e-4, betas=betas, eps=eps)
    node_of = {100 + k: k for k in range(num_nodes)}
    arrays = ArrayRecord(central.state_dict())
    out = []
    for rnd in range(1, rounds + 1):
        msgs = list(strategy.configure_train(rnd, arrays, sent.to_record(), NodeGrid(node_of)))
        assert len(msgs) == num_nodes
        replies = [_node_reply(m, *parts[node_of[m.metadata.dst_node_id]], node_of[m.metadata.dst_node_id], rnd)
                   for m in msgs]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        grads = [_centralized_gradient(central, *parts[k], k, rnd, cfg.client.batch_size) for k in range(num_nodes)]
        for prm, *per_node in zip(central.parameters(), *grads):
            prm.grad = torch.stack(per_node).mean(0)
        adam.step()
        mean_grad = {name: prm.grad.detach().clone() for name, prm in central.named_parameters()}
        out.append((arrays.to_torch_state_dict(), {k: v.detach().clone() for k, v in central.state_dict().items()},
                    mean_grad))
    return out


def test_fedsgd_step_is_one_torch_adam_step_on_the_averaged_gradient(task_identity, mnist_root):
    """Conditions: seed 003's preset (MLP 784-128-1280-10 with dropout 0.2 in training mode,
    batch 32, client SGD lr 1, momentum 0, one local step, strategy sgd_adam = FedSGD with
    eta 1e-4, betas 0.9/0.999, eps 1e-8) on 20 nodes of 600 real MNIST images each, for 3
    rounds (Adam steps 1-3, so the bias correction is exercised). Each node's batch and dropout
    mask are seeded; the centralized side recomputes the same gradients with autograd, averages
    them and steps torch.optim.Adam(lr=1e-4).

    Result: all but 0.2% of the weights agree within 1e-8 (a few float32 ulps; an off-by-one
    bias correction or a misplaced eps moves weights by ~1e-5, see the next test). The rest
    sit where the averaged gradient g is within ~100 eps of zero (checked in round 1): there
    Adam's m / (sqrt(v) + eps) amplifies the float32 rounding of the nodes' replies w - g_k
    (delta <= ulp(max |w| = 0.09) / 2 = 3.7e-9), by at most lr * delta / (4 eps) = 9.3e-6 in a
    step; every weight agrees within 1e-5. No protocol that exchanges float32 models avoids it."""
    strategy = build_strategy(compose_config(["experiment=seed003", "num_nodes=20"]).strategy)
    assert type(strategy) is FedSGD
    rounds = _federated_vs_adam(strategy, mnist_root, num_nodes=20, rounds=3)
    for rnd, (fed, ref, grad) in enumerate(rounds, 1):
        diff = {k: (fed[k] - ref[k]).abs() for k in ref}
        flat = torch.cat([d.flatten() for d in diff.values()])
        assert flat.max().item() < 1e-5, f"round {rnd}: federated and Adam differ by {flat.max().item():.3g}"
        share = (flat > 1e-8).float().mean().item()
        assert share < 2e-3, f"round {rnd}: {(flat > 1e-8).sum()} weights differ by more than 1e-8"
        if rnd == 1:
            for k, d in diff.items():
                assert (grad[k][d > 1e-8].abs() < 1e-6).all(), k
    start_moved = max((rounds[-1][1][k] - rounds[0][1][k]).abs().max().item() for k in rounds[0][1])
    assert start_moved > 1e-4  # the weights really moved (two more steps of lr 1e-4)


def test_flowers_fedadam_is_not_torch_adam_under_the_same_conditions(task_identity, mnist_root):
    """Conditions as above (5 nodes, 1 round), Flower 1.41's FedAdam given torch's values
    (eta 1e-4, eta_l 1, beta_1 0.9, beta_2 0.999, tau 1e-8). Its first step is corrected with
    server_round + 1 = 2 (fedadam.py: ``np.power(self.beta_2, server_round + 1.0)``), i.e.
    sqrt(1 - 0.999^2) / (1 - 0.9^2) = 0.2353 instead of Adam's sqrt(1 - 0.999) / (1 - 0.9) =
    0.3162: each weight moves 0.744 times as far as under torch.optim.Adam."""
    strategy = FedAdam(eta=1e-4, eta_l=1.0, beta_1=0.9, beta_2=0.999, tau=1e-8, min_available_nodes=5,
                       min_train_nodes=5, fraction_evaluate=0.0)
    torch.manual_seed(3)
    start = MLP(hidden=128, hidden2=1280, dropout=0.2).state_dict()
    [(fed, ref, _)] = _federated_vs_adam(strategy, mnist_root, num_nodes=5, rounds=1)
    fed_step = torch.cat([(fed[k] - start[k]).flatten() for k in start])
    adam_step = torch.cat([(ref[k] - start[k]).flatten() for k in start])
    big = adam_step.abs() > 0.9e-4  # |g| >> eps: Adam's first step is lr * sign(g)
    assert big.float().mean() > 0.5
    ratio = (fed_step[big] / adam_step[big]).median().item()
    expected = (np.sqrt(1 - 0.999**2) / (1 - 0.9**2)) / (np.sqrt(1 - 0.999) / (1 - 0.9))
    assert ratio == pytest.approx(expected, rel=1e-3)  # 0.744
    assert (fed_step - adam_step).abs().max().item() > 2e-5


def test_fedsgd_behind_the_screen_takes_adams_first_step(task_identity):
    """Conditions: Guarded(FedSGD) with the reply screen, two FakeNodes replying w - 0.01 and
    w - 0.03 (10 and 20 examples), client lr 1: the example-weighted mean gradient is 0.0233
    everywhere, and Adam's first step is -lr * sign(g) (|g| >> eps): every weight moves by -1e-4."""
    strategy = FedSGD(min_available_nodes=2, fraction_evaluate=0.0)
    arrays, metrics = sync_round(Guarded(strategy, make_path()), {11: FakeNode(0, -0.01), 12: FakeNode(1, -0.03)},
                                 START, 1)
    for k, v in shifted(START, -1e-4).items():
        np.testing.assert_allclose(to_weights(arrays)[k], v, rtol=0, atol=2e-7)
    for k in START:  # Adam's moments after one step: m = 0.1 g, v = 0.001 g^2
        np.testing.assert_allclose(strategy.m_t[k], 0.1 * 0.7 / 30, rtol=1e-5)
        np.testing.assert_allclose(strategy.v_t[k], 0.001 * (0.7 / 30) ** 2, rtol=1e-5)
    assert metrics[p.NUM_EXAMPLES] == 30 and strategy.adam_steps == 1


def test_fedsgd_counts_adams_steps_not_rounds(task_identity):
    """Round 1's replies are all rejected (NaN): no step. Round 2's honest replies take Adam's
    FIRST step, -lr * sign(g) on every weight (with t = 2, the round, it was 0.744 times that)."""
    strategy = FedSGD(min_available_nodes=2, fraction_evaluate=0.0)
    guarded = Guarded(strategy, make_path())
    arrays, _ = sync_round(guarded, {11: FakeNode(0, -0.01, behave="nan"), 12: FakeNode(1, -0.03, behave="nan")},
                           START, 1)
    assert arrays is None and strategy.adam_steps == 0
    arrays, _ = sync_round(guarded, {11: FakeNode(0, -0.01), 12: FakeNode(1, -0.03)}, START, 2)
    for k, v in shifted(START, -1e-4).items():
        np.testing.assert_allclose(to_weights(arrays)[k], v, rtol=0, atol=2e-7)
    assert strategy.adam_steps == 1
