"""The effect guard on real MNIST updates (flmnist/engine/effect_guard.py): it rejects one
hostile update of four (model replacement, sign flip x5, boost x10) and keeps every honest one,
also on seed 002's disjoint digit groups where each honest update alone forgets the other digits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flmnist.core.arrays import to_record, to_weights
from flmnist.engine.effect_guard import Candidate, EffectGuard, fedavg
from flmnist.ml.data import load_mnist
from flmnist.ml.models import LeNet, LogReg
from flmnist.ml.training import train
from flmnist.observers.probe import Probe
from flmnist.protocol.messages import NUM_EXAMPLES, UNIT_WEIGHT

GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(str(mnist_root), True), load_mnist(str(mnist_root), False)


def weights_of(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def trained(start: dict, images, labels, steps: int = 40, seed: int = 0) -> dict:
    """A node's trained model (logistic regression, SGD lr 0.1, batch 32)."""
    model = LogReg()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items()})
    train(model, images, labels, batch_size=32, lr=0.1, steps=steps, generator=torch.Generator().manual_seed(seed))
    return weights_of(model)


def start_model(x, y, steps: int) -> dict:
    torch.manual_seed(0)
    start = weights_of(LogReg())
    return trained(start, x[:3000], y[:3000], steps=steps, seed=9) if steps else start


def attack(kind: str, start: dict, honest_model: dict) -> dict:
    """The delta node 0 sends under each attack of flmnist/client/faults.py."""
    d = {k: honest_model[k] - start[k] for k in start}
    if kind == "replace":
        return {k: -5 * honest_model[k] - start[k] for k in start}
    if kind == "sign-flip":
        return {k: -5 * v for k, v in d.items()}
    return {k: 10 * v for k, v in d.items()}  # boost


@pytest.mark.parametrize("warm", [0, 60], ids=["first-round", "later-round"])
@pytest.mark.parametrize("kind", ["replace", "sign-flip", "boost"])
def test_one_hostile_update_of_four_is_rejected_and_the_honest_ones_kept(mnist, kind, warm):
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, warm)
    rng = np.random.default_rng(1)
    shards = np.array_split(rng.permutation(len(y))[:8000], 4)
    models = [trained(start, x[s], y[s], seed=i) for i, s in enumerate(shards)]
    candidates = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0) for i, m in enumerate(models)]
    candidates[0] = Candidate(0, "node 0", attack(kind, start, models[0]), 2000.0)
    guard = EffectGuard(Probe(tx, ty, LogReg), max_harm=2.0)
    rejected = guard.judge(start, candidates, asynchronous=False)
    if kind == "boost" and not warm:
        # From the random initial model a 10x step can even help: kept only if the aggregate with it
        # is at most 2 points worse than without it (the guard's rule), and no honest node goes.
        assert [c.name for c, _ in rejected] in ([], ["node 0"])
        if not rejected:
            with_all = np.nan_to_num(guard.probe.per_digit(start, EffectGuard.mean(candidates))).mean()
            without = np.nan_to_num(guard.probe.per_digit(start, EffectGuard.mean(candidates[1:]))).mean()
            assert 100 * (without - with_all) <= 2.0, (with_all, without)
        return
    assert [c.name for c, _ in rejected] == ["node 0"]
    reason = rejected[0][1]
    assert reason.startswith("makes the aggregate worse on the probe set (")
    assert "per digit, with minus without: 0:" in reason and "screen.guard_max_harm=2" in reason
    assert guard.summary()["rejected"] == 1 and guard.summary()["probed"] == 1


def test_a_synchronous_round_keeps_the_scores_of_its_accepted_updates_aggregate_only(mnist):
    """With the nodes' trained models, the guard's aggregates are FedAvg's; of those it scores, the
    probe keeps only the accepted updates' (the global model FedAvg makes next), not the one with
    the rejected update in it, which no global model will be."""
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    shards = np.array_split(np.random.default_rng(1).permutation(len(y))[:8000], 4)
    models = [trained(start, x[s], y[s], seed=i) for i, s in enumerate(shards)]
    models[0] = {k: start[k] + v for k, v in attack("sign-flip", start, models[0]).items()}
    candidates = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0 + i, m, {NUM_EXAMPLES: 2000 + i})
                  for i, m in enumerate(models)]
    probe = Probe(tx, ty, LogReg)
    guard = EffectGuard(probe, max_harm=2.0)
    assert [c.name for c, _ in guard.judge(start, candidates, asynchronous=False)] == ["node 0"]
    assert guard.evaluations == 5 + 4  # with all four and without each; again with the three, without each
    assert probe.known_scores(fedavg(candidates[1:])) is not None
    assert probe.known_scores(fedavg(candidates)) is None and len(probe._known) == 1


@pytest.mark.parametrize("weighted_by", [NUM_EXAMPLES, UNIT_WEIGHT])
def test_the_guards_fedavg_is_flowers_aggregate_bit_for_bit(weighted_by):
    """The guard's aggregates are made from the decoded models (no decoding per aggregate): every
    value equals Flower's own ``aggregate_arrayrecords`` over the same replies, so the aggregate
    the guard scores is the global model FedAvg makes (its scores are kept for attribution)."""
    rng = np.random.default_rng(5)
    shapes = {"conv.weight": (20, 1, 5, 5), "conv.bias": (20,), "fc.weight": (10, 800), "steps": ()}
    members = []
    for i, examples in enumerate([24754, 17181, 18065, 1, 99991]):
        model = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items() if s}
        model["steps"] = np.asarray(rng.integers(0, 9), dtype=np.float64)  # a 0-d array, another dtype
        model["counts"] = rng.integers(0, 1000, (10,), dtype=np.int64)  # (times a float: float64, in both)
        members.append(Candidate(i, f"node {i}", {}, float(examples), model, {NUM_EXAMPLES: examples, UNIT_WEIGHT: 1}))
    before = [{k: v.copy() for k, v in m.model.items()} for m in members]
    for some in (members[:1], members[:3], members):
        ours = fedavg(some, weighted_by)
        contents = [RecordDict({"arrays": to_record(m.model), "metrics": MetricRecord(m.metrics)}) for m in some]
        flowers = to_weights(aggregate_arrayrecords(contents, weighted_by))
        assert list(ours) == list(flowers)
        for k, v in flowers.items():
            assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and np.array_equal(ours[k], v), k
        assert not np.array_equal(ours["fc.weight"], some[0].model["fc.weight"]) or len(some) == 1
        assert ours["counts"].dtype == np.float64
    for m, kept in zip(members, before):  # the replies' models are left as they were
        assert all(np.array_equal(m.model[k], v) and m.model[k].dtype == v.dtype for k, v in kept.items())


def seed002_candidates(x, y, start, contents: bool = False) -> list[Candidate]:
    """Seed 002's three digit groups, each node's update after 10 steps on its own digits."""
    candidates = []
    for i, group in enumerate(GROUPS):
        idx = torch.from_numpy(np.flatnonzero(np.isin(y.numpy(), group))[:6000])
        model = trained(start, x[idx], y[idx], steps=10, seed=i)
        candidates.append(Candidate(i, f"node {i}", {k: model[k] - start[k] for k in start}, float(len(idx)),
                                    model if contents else None, {NUM_EXAMPLES: len(idx)} if contents else None))
    return candidates


class EveryImage(EffectGuard):
    """The guard as it was before it stopped early: every aggregate evaluated on every probe image."""

    def accuracy_unless_below(self, before, members, ceiling):
        return self.aggregate_accuracy(before, members)[0]


def harms(probe: Probe, start: dict, candidates: list[Candidate]) -> list[float]:
    """Each candidate's leave-one-out harm (pp), every probe image evaluated."""
    reference = EveryImage(probe)
    with_all = reference.aggregate_accuracy(start, candidates)[0].mean()
    return [100 * float(reference.aggregate_accuracy(start, [m for m in candidates if m is not c])[0].mean() - with_all)
            for c in candidates]


SYNC_CASES = ["seed002", "seed002-contents", "replace", "sign-flip", "boost"]


@pytest.mark.parametrize("case,margin", [(c, None) for c in [*SYNC_CASES, "async"]]
                         + [(c, m) for c in SYNC_CASES for m in (-0.01, 0.01)])
def test_the_guard_stops_evaluating_a_harmless_aggregate_early_and_decides_as_with_every_image(mnist, case, margin):
    """An aggregate without an update whose accuracy cannot beat the aggregate with it by more than
    ``max_harm``, even if every probe image not yet evaluated came out right, needs no more images:
    that update is not the one rejected. The guard rejects the same updates with the same reasons
    and counts as the guard that evaluates every image (in the probe's batches), also with ``max_harm``
    0.01 pp either side of the largest harm (the bound decides at the threshold itself), and
    evaluates fewer images where every update is harmless (seed 002's groups)."""
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    if case.startswith("seed002"):
        candidates = seed002_candidates(x, y, start, contents=case.endswith("contents"))
    else:
        shards = np.array_split(np.random.default_rng(1).permutation(len(y))[:8000], 4)
        models = [trained(start, x[s], y[s], seed=i) for i, s in enumerate(shards)]
        candidates = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0) for i, m in enumerate(models)]
        candidates[0] = Candidate(0, "node 0", attack("replace" if case == "async" else case, start, models[0]), 2000.0)
    max_harm = 2.0
    if margin is not None:
        each = harms(Probe(tx, ty, LogReg, batch_size=100), start, candidates)
        max_harm = max(each) + margin
    judged = {}
    for kind in (EveryImage, EffectGuard):
        guard = kind(Probe(tx, ty, LogReg, batch_size=100), max_harm=max_harm)
        if case == "async":
            guard.window.extend(candidates[1:])
            judged[kind] = (guard.judge(start, candidates[:1], asynchronous=True), guard)
        else:
            judged[kind] = (guard.judge(start, candidates, asynchronous=False), guard)
    (whole, reference), (early, guard) = judged[EveryImage], judged[EffectGuard]
    assert [(c.name, reason) for c, reason in early] == [(c.name, reason) for c, reason in whole]
    assert (guard.evaluations, guard.probed) == (reference.evaluations, reference.probed) and guard.probed == 1
    assert reference.images == 1000 * reference.evaluations and guard.images <= reference.images
    if margin is None:
        assert [c.name for c, _ in whole] == ([] if case.startswith("seed002") else ["node 0"])
    elif margin < 0:  # the most harmful update, just over the threshold, goes first
        assert [c.name for c, _ in whole][:1] == [candidates[int(np.argmax(each))].name]
    else:
        assert whole == []
    if case.startswith("seed002") and margin is None:  # each update holds digits nobody else does
        assert guard.images < reference.images and guard.summary()["probe_images_evaluated"] == guard.images
        assert guard.report() == (f"Effect guard (screen.guard_max_harm=2): 3 updates judged, probed 1 time (4 "
                                  f"aggregates on {guard.images:,} probe images, {guard.seconds:.1f} s; "
                                  "screen.guard_max_harm=null turns the guard off), 0 rejected")


def test_an_evaluation_stops_only_when_the_rest_of_the_probe_cannot_lift_it_over_the_ceiling(mnist):
    """Probe.per_digit_unless_below: None only for a model whose whole-probe mean is at most the
    ceiling, after fewer images than the probe holds; otherwise per_digit's figures bit for bit."""
    (x, y), (tx, ty) = mnist
    probe = Probe(tx, ty, LogReg, size=1003, batch_size=100)  # (uneven: the first three digits hold 101)
    for steps in (0, 5, 60):
        weights = start_model(x, y, steps)
        mean = float(np.nan_to_num(probe.per_digit(weights)).mean())
        for ceiling in (0.0, mean - 0.05, mean, mean + 0.05, mean + 0.5, 2.0):
            accuracy, images = probe.per_digit_unless_below(weights, None, ceiling)
            if accuracy is None:
                assert mean <= ceiling and images < probe.size, (steps, ceiling)
            else:
                assert images == probe.size and np.array_equal(accuracy, probe.per_digit(weights), equal_nan=True)
        for ceiling in mean + np.linspace(-0.01, 0.01, 21):  # at the mean itself, either side
            accuracy, images = probe.per_digit_unless_below(weights, None, ceiling)
            assert accuracy is not None or mean <= ceiling, (steps, ceiling - mean)
        assert probe.per_digit_unless_below(weights, None, mean - 1e-6)[0] is not None
        assert probe.per_digit_unless_below(weights, None, 2.0) == (None, 100)  # any model scores at most 1
    # a digit the probe lacks counts 0 in the mean, as in the guard's: the bound gives it no credit
    keep = ty != 9
    lacking = Probe(tx[keep], ty[keep], LogReg, size=900, batch_size=100)
    weights = start_model(x, y, 60)
    mean = float(np.nan_to_num(lacking.per_digit(weights)).mean())
    assert np.isnan(lacking.per_digit(weights)[9]) and mean <= 0.9
    for ceiling in mean + np.linspace(-0.01, 0.01, 21):
        accuracy, images = lacking.per_digit_unless_below(weights, None, ceiling)
        assert accuracy is not None or (mean <= ceiling and images < lacking.size), ceiling - mean
    assert lacking.per_digit_unless_below(weights, None, 0.9)[0] is None  # nine digits right at most: 0.9


def test_on_the_cpu_the_digits_a_model_fails_are_evaluated_first_so_it_stops_sooner(mnist):
    """A model that never saw digits 0-3 (as seed002's aggregate without the node holding them):
    its evaluation against a ceiling it cannot reach stops after a tenth of each digit and the
    failed digits' chunks it needs (300 images for 0.8, 400 for 0.7), where the probe's own order
    (mixed digits, batches of 250) needs 500 and 750; a model it cannot stop for gets per_digit's
    figures either way."""
    (x, y), (tx, ty) = mnist
    upper = torch.from_numpy(np.flatnonzero(y.numpy() >= 4)[:6000])
    weights = trained(start_model(x, y, 0), x[upper], y[upper], steps=60)
    probe = Probe(tx, ty, LogReg, size=1000, batch_size=250)
    accuracy = np.nan_to_num(probe.per_digit(weights))
    assert accuracy[:4].max() == 0 and accuracy[4:].min() > 0.5
    assert probe.worst_first == (probe.device.type == "cpu")
    probe.worst_first = True  # (the CPU's order, on any device)
    assert [probe.per_digit_unless_below(weights, None, ceiling) for ceiling in (0.8, 0.7)] == [(None, 300), (None, 400)]
    probe.worst_first = False  # the probe's own order, as on a GPU
    assert [probe.per_digit_unless_below(weights, None, ceiling) for ceiling in (0.8, 0.7)] == [(None, 500), (None, 750)]
    for worst_first in (True, False):
        probe.worst_first = worst_first
        figures, images = probe.per_digit_unless_below(weights, None, accuracy.mean() - 0.01)
        assert images == 1000 and np.array_equal(figures, probe.per_digit(weights), equal_nan=True)


@pytest.mark.parametrize("size", [1000, 1001])
def test_a_cnns_evaluation_worst_digits_first_has_per_digits_figures_bit_for_bit(mnist, size):
    """LeNet, untrained (its outputs close together: near ties), evaluated worst digits first to
    the end (a ceiling nothing is below): a tenth of each digit, then chunks of a tenth of the probe
    and, at 1,001 images, a last chunk of one image; the figures are those of the probe's own
    batches of 250 (on the CPU an image's prediction does not depend on its batch)."""
    _, (tx, ty) = mnist
    torch.manual_seed(size)
    weights = weights_of(LeNet())
    probe = Probe(tx, ty, LeNet, size=size, batch_size=250)
    probe.worst_first = True
    figures, images = probe.per_digit_unless_below(weights, None, -1.0)
    assert images == size and np.array_equal(figures, probe.per_digit(weights), equal_nan=True)
    assert 0 < np.nanmean(figures) < 0.5  # (an untrained model: some right, most wrong)


def test_under_equal_weights_an_update_claiming_one_example_is_judged_at_its_real_share(mnist):
    """strategy=unweighted_fedavg averages with equal weights. A sign-flipping node claiming 1
    example (the screen allows 1 to its partition's size) weighed 1/6001 in the guard's aggregate,
    so its harm measured about 0 and it passed, and then counted 1/4 in the real average. Judged
    with the strategy's weights (equal_weights, from the strategy), it is rejected."""
    from flmnist.engine.effect_guard import equal_weights
    from flmnist.strategies import FedAvg, FedBuff

    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    rng = np.random.default_rng(1)
    shards = np.array_split(rng.permutation(len(y))[:8000], 4)
    models = [trained(start, x[s], y[s], seed=i) for i, s in enumerate(shards)]
    candidates = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0) for i, m in enumerate(models)]
    candidates[0] = Candidate(0, "node 0", attack("sign-flip", start, models[0]), 1.0)
    by_examples = EffectGuard(Probe(tx, ty, LogReg), max_harm=2.0)
    assert by_examples.judge(start, candidates, asynchronous=False) == []  # FedAvg's own share of it: 1/6001
    equal = EffectGuard(Probe(tx, ty, LogReg), max_harm=2.0, equal_weights=True)
    assert [c.name for c, _ in equal.judge(start, candidates, asynchronous=False)] == ["node 0"]
    assert equal.summary()["weights"] == "equal" and by_examples.summary()["weights"] == "examples"
    assert equal_weights(FedAvg(weighted_by_key="unit-weight")) and not equal_weights(FedAvg())
    assert equal_weights(FedBuff(weight_by_examples=False)) and not equal_weights(FedBuff())
    # Flower's robust aggregators ignore the example counts (a review: FedTrimmedAvg on 4 nodes, whose
    # default trim is 0, averaged the claimed-1 sign flip at 1/4 while the guard weighed it 1/6001)
    from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

    assert all(equal_weights(s) for s in (FedMedian(), FedTrimmedAvg(), Bulyan(), Krum()))
    assert not equal_weights(MultiKrum())  # averages the updates it keeps by their examples


def test_honest_iid_updates_are_not_even_probed(mnist):
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    shards = np.array_split(np.random.default_rng(2).permutation(len(y))[:8000], 4)
    candidates = [Candidate(i, f"node {i}", {k: v - start[k] for k, v in trained(start, x[s], y[s], seed=i).items()},
                            2000.0) for i, s in enumerate(shards)]
    guard = EffectGuard(Probe(tx, ty, LogReg))
    assert guard.judge(start, candidates, asynchronous=False) == []
    assert guard.evaluations == 0  # the cheap test let them through


@pytest.mark.parametrize("warm", [0, 60, 400], ids=["first-round", "later-round", "late-round"])
def test_seed002_digit_group_updates_are_all_kept(mnist, warm):
    """Each node holds digits nobody else holds: its update alone forgets the others, but the
    aggregate without it is worse on its own digits, so no honest update is rejected."""
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, warm)
    candidates = []
    for i, group in enumerate(GROUPS):
        idx = torch.from_numpy(np.flatnonzero(np.isin(y.numpy(), group))[:6000])
        model = trained(start, x[idx], y[idx], steps=10, seed=i)
        candidates.append(Candidate(i, f"node {i}", {k: model[k] - start[k] for k in start}, float(len(idx))))
    guard = EffectGuard(Probe(tx, ty, LogReg))
    assert guard.judge(start, candidates, asynchronous=False) == []


def test_asynchronous_updates_are_judged_against_the_recent_accepted_ones(mnist):
    """FedAsync/FedBuff: each arriving update is judged with the last accepted ones; a
    replacement arriving after three honest updates is rejected, and not remembered."""
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    shards = np.array_split(np.random.default_rng(3).permutation(len(y))[:8000], 4)
    models = [trained(start, x[s], y[s], seed=i) for i, s in enumerate(shards)]
    guard = EffectGuard(Probe(tx, ty, LogReg), window=10)
    for i in (1, 2, 3):
        assert guard.judge(start, [Candidate(i, f"node {i}", {k: models[i][k] - start[k] for k in start}, 2000.0)],
                           asynchronous=True) == []
    bad = Candidate(0, "node 0", attack("replace", start, models[0]), 2000.0)
    assert [c.name for c, _ in guard.judge(start, [bad], asynchronous=True)] == ["node 0"]
    assert [c.name for c in guard.window] == ["node 1", "node 2", "node 3"]


def test_an_asynchronous_update_is_judged_among_other_nodes_latest_not_its_own_earlier_ones(mnist):
    """A fast node whose updates all point one useless way filled the window with its own earlier
    updates, so each new one agreed with "the others" and passed the cheap test unprobed. The
    window holds each node's latest accepted update, and a node is judged among the others'."""
    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    honest = {k: v - start[k] for k, v in trained(start, x[:2000], y[:2000], seed=1).items()}
    odd = {k: np.random.default_rng(5).normal(size=v.shape).astype(np.float32) for k, v in honest.items()}
    scale = np.float32(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in honest.values())
                               / sum((v.astype(np.float64) ** 2).sum() for v in odd.values())))
    odd = {k: v * scale for k, v in odd.items()}  # as long as an honest update, pointing elsewhere
    guard = EffectGuard(Probe(tx, ty, LogReg), window=10)
    guard.judge(start, [Candidate(1, "node 1", honest, 2000.0)], asynchronous=True)
    for i in range(4):
        guard.judge(start, [Candidate(i, "node 0", odd, 2000.0)], asynchronous=True)
    assert [c.name for c in guard.window] == ["node 1", "node 0"]  # one each: node 0's latest
    probed = guard.probed
    guard.judge(start, [Candidate(9, "node 0", odd, 2000.0)], asynchronous=True)
    assert guard.probed == probed + 1  # against node 1's update: it points away, so it is probed


def test_a_buffered_strategy_judges_an_update_among_as_many_as_its_buffer_holds(mnist):
    """FedBuff with a buffer of 4 averages an attacker with 3 others: among the last 10 accepted
    updates a sign flip x3 is diluted below the threshold (0.5 pp), among the last 3 (what
    ``ReplyPath.aggregate_size(4)`` keeps) it shows its real harm (7 pp) and is rejected."""
    from flmnist.engine.reply_path import ReplyPath
    from flmnist.protocol.screen import ReplyScreen, ScreenSettings
    from flmnist.strategies.fedbuff import FedBuff

    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    shards = np.array_split(np.random.default_rng(4).permutation(len(y))[:22000], 11)
    models = [trained(start, x[s], y[s], steps=10, seed=i) for i, s in enumerate(shards)]
    honest = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0) for i, m in enumerate(models)]
    bad = Candidate(0, "node 0", {k: -3 * v for k, v in honest[0].delta.items()}, 2000.0)

    wide = EffectGuard(Probe(tx, ty, LogReg), window=10)
    wide.window.extend(honest[1:])
    assert wide.judge(start, [bad], asynchronous=True) == []   # diluted 1 in 11

    guard = EffectGuard(Probe(tx, ty, LogReg), window=10)
    strategy = FedBuff(buffer_size=10)
    strategy.limit_concurrency(4)
    path = ReplyPath(ReplyScreen(ScreenSettings(), limits=None), sent=None, guard=guard, asynchronous=True)
    path.aggregate_size(strategy.aggregate_size())
    assert guard.pool_size == 3 and guard.window.maxlen == 10  # one per node kept; judged among the newest 3
    guard.window.extend(honest[1:])
    assert [c.name for c, _ in guard.judge(start, [bad], asynchronous=True)] == ["node 0"]


def test_fedasync_judges_an_update_among_one_other_with_equal_weights(mnist):
    """FedAsync mixes each update in alone at alpha * s(staleness) (0.6 fresh) and ignores its
    examples. The guard judged it among the last 10 accepted updates, weighted by the examples each
    claimed: a sign flip x3 claiming one example weighed nothing there and passed (trust.md: "one of
    node 0's three updates" got in under FedAsync). Now: among one other, equally weighted: rejected."""
    from flmnist.engine.effect_guard import equal_weights
    from flmnist.engine.reply_path import ReplyPath
    from flmnist.protocol.screen import ReplyScreen, ScreenSettings
    from flmnist.strategies import FedAsync

    (x, y), (tx, ty) = mnist
    start = start_model(x, y, 60)
    shards = np.array_split(np.random.default_rng(4).permutation(len(y))[:22000], 11)
    models = [trained(start, x[s], y[s], steps=10, seed=i) for i, s in enumerate(shards)]
    honest = [Candidate(i, f"node {i}", {k: m[k] - start[k] for k in start}, 2000.0) for i, m in enumerate(models)]
    bad = Candidate(0, "node 0", {k: -3 * v for k, v in honest[0].delta.items()}, 1.0)  # claims one example

    guard = EffectGuard(Probe(tx, ty, LogReg), window=10)
    strategy = FedAsync()
    path = ReplyPath(ReplyScreen(ScreenSettings(), limits=None), sent=None, guard=guard, asynchronous=True)
    path.aggregate_size(strategy.aggregate_size())
    guard.equal_weights = equal_weights(strategy)  # as run_setup.build_run sets it
    assert guard.pool_size == 1 and guard.equal_weights
    guard.window.extend(honest[1:])
    [(judged, reason)] = guard.judge(start, [bad], asynchronous=True)
    assert judged.name == "node 0" and "makes the aggregate worse on the probe set" in reason
    assert guard.judge(start, [honest[0]], asynchronous=True) == []  # the honest update of the same node passes
    # Its next update is judged among another node's latest, not alone (the window held one update, so
    # the node's own accepted one pushed the other out and the next was judged against the bare model)
    seen = []
    mean = guard.mean
    guard.mean = lambda members: (seen.append([m.name for m in members]), mean(members))[1]
    guard.judge(start, [bad], asynchronous=True)
    assert seen and seen[0] == ["node 10", "node 0"], seen


SPIN_PROBE = """
import os, threading, time
import numpy as np
from flmnist.engine.effect_guard import Candidate, EffectGuard
from flmnist.ml.models import LeNet
from flmnist.protocol.screen import update_norm

def others_cpu():  # CPU seconds of every thread but this one
    me, ticks = threading.get_native_id(), 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            ticks += sum(int(x) for x in open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[11:13])
    return ticks / os.sysconf("SC_CLK_TCK")

def measure(fn):
    start = others_cpu()
    for _ in range(10):
        fn()
        time.sleep(0.01)
    return others_cpu() - start

rng = np.random.default_rng(0)
shapes = {k: tuple(v.shape) for k, v in LeNet().state_dict().items()}
cands = [Candidate(i, f"node {i}", {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, 1.0)
         for i in range(3)]
ours = measure(lambda: (EffectGuard.suspicious(cands, []), update_norm(cands[0].delta, cands[1].delta, False)))
flat = np.concatenate([v.ravel() for v in cands[0].delta.values()]).astype(np.float64)
blas = measure(lambda: float(np.linalg.norm(flat)))
print(ours, blas)
"""


def test_the_guard_and_the_screen_leave_no_blas_thread_spinning():
    """Their norms and cosines are elementwise: a BLAS call (``np.linalg.norm``, ``@``) wakes
    OpenBLAS's worker thread, which spins for up to 0.1 s on a core the training or the probe
    needs (docs/benchmarks.md). Measured as CPU time of the process's other threads, in a fresh
    interpreter with numpy's default BLAS threads; a BLAS norm in the same process is the control."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", SPIN_PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    ours, blas = map(float, out.stdout.split())
    assert ours < 0.03, f"other threads worked {ours:.2f} s while the guard and the screen measured updates"
    if (os.cpu_count() or 1) > 1:  # the control: with a BLAS worker thread, a BLAS norm shows it spinning
        assert blas > ours


def test_a_boosted_update_beside_one_other_is_probed():
    """Two nodes: the median of two lengths is their mean, so an update boosted 10x the way the
    other points stayed under 3x it and passed unprobed. Each length is now held against the
    others' (and the recent accepted updates'), and the boost stands out; honest lengths pass."""
    honest = {"w": np.full(10, 0.01, dtype=np.float32)}
    boosted = {"w": np.full(10, 0.1, dtype=np.float32)}
    pair = [Candidate(0, "node 0", honest, 1.0), Candidate(1, "node 1", boosted, 1.0)]
    assert EffectGuard.suspicious(pair, [])
    recent = [float(np.linalg.norm(honest["w"]))] * 3
    assert EffectGuard.suspicious(pair, [], recent)
    assert not EffectGuard.suspicious([pair[0], Candidate(2, "node 2", dict(honest), 1.0)], [], recent)
    assert not EffectGuard.suspicious([pair[0], Candidate(2, "node 2", dict(honest), 1.0)], [])
