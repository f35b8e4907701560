"""Per-node digit attribution: the probe set, the measure on real MNIST models, and real
`flwr run`s in which the table must single out the right node (seed 002's disjoint digit groups,
synchronous; one sign-flipping node, asynchronous)."""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from flmnist.launch.flwr_local import run_flwr
from flmnist.ml.data import load_mnist
from flmnist.ml.models import LogReg
from flmnist.ml.training import train
from flmnist.observers.attribution import Attribution, probe_indices

REPO = Path(__file__).resolve().parents[1]
GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # seed 002's nodes


def test_the_probe_set_is_stratified_and_the_same_in_every_run():
    labels = np.repeat(np.arange(10), 500)[np.random.default_rng(1).permutation(5000)]
    idx = probe_indices(labels, 1000)
    assert np.array_equal(idx, probe_indices(labels, 1000))  # fixed, whatever the run's seed
    assert np.bincount(labels[idx], minlength=10).tolist() == [100] * 10
    assert len(set(idx.tolist())) == 1000
    assert np.bincount(labels[probe_indices(labels, 25)], minlength=10).tolist() == [3] * 5 + [2] * 5


@pytest.fixture(scope="module")
def mnist(mnist_root):
    return load_mnist(str(mnist_root), True), load_mnist(str(mnist_root), False)


def weights_of(model: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def trained_delta(start: dict, images, labels, steps: int = 60) -> dict:
    """What one node's local training (logistic regression, SGD lr 0.1, batch 64) changes."""
    model = LogReg()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in start.items()})
    train(model, images, labels, batch_size=64, lr=0.1, steps=steps, generator=torch.Generator().manual_seed(0))
    return {k: weights_of(model)[k] - start[k] for k in start}


def test_disjoint_digit_groups_are_credited_to_the_node_that_holds_them(mnist):
    """Three rounds of seed 002's split, the global model the plain average of the nodes: for every
    digit, the node that helped it most is the one holding it, and another node hurt it most."""
    (x, y), (tx, ty) = mnist
    torch.manual_seed(0)
    hook = Attribution(tx, ty, LogReg, probe_size=500)
    model = weights_of(LogReg())
    for step in (1, 2, 3):
        deltas = []
        for node, group in enumerate(GROUPS):
            mask = torch.isin(y, torch.tensor(group))
            deltas.append((f"node {node}", trained_delta(model, x[mask][:3000], y[mask][:3000], steps=20)))
        out = hook.attribute(step, model, deltas, key=step)  # what updates_applied runs
        assert set(out) == {"node 0", "node 1", "node 2"}
        model = {k: model[k] + sum(d[k] for _, d in deltas) / 3 for k in model}
    helped, hurt = hook.helped_and_hurt()
    for node, group in enumerate(GROUPS):
        for d in group:
            assert helped[d] == f"node {node}", (d, hook.totals)
            assert hurt[d] not in (None, f"node {node}"), (d, hook.totals)
    assert hook.evaluations == 3 * (1 + 3)  # the model before each round once, each update once


@pytest.mark.parametrize("backend", ["inprocess", "ray"])
def test_attribution_in_the_background_adds_up_exactly_what_it_computes_in_line(mnist, monkeypatch, backend):
    """updates_applied starts the evaluations in the background (in-process: on the PyTorch
    thread; else on a worker thread of its own) while the guard uses the same probe from the
    ServerApp's thread: every figure equals the one-at-a-time computation, bit for bit."""
    from flmnist.core.constants import BACKEND_ENV
    from flmnist.observers.probe import Probe

    monkeypatch.setenv(BACKEND_ENV, backend)
    (x, y), (tx, ty) = mnist
    torch.manual_seed(0)
    model = weights_of(LogReg())
    rounds = []
    for step in (1, 2, 3):
        deltas = [(f"node {n}", trained_delta(model, x[1000 * n:1000 * n + 1000], y[1000 * n:1000 * n + 1000],
                                              steps=5)) for n in range(3)]
        rounds.append((step, model, deltas))
        model = {k: model[k] + sum(d[k] for _, d in deltas) / 3 for k in model}
    in_line = Attribution(tx, ty, LogReg, probe_size=500)
    for step, before, deltas in rounds:
        in_line.attribute(step, before, deltas, key=step)
    probe = Probe(tx, ty, LogReg, 500, 250)
    background = Attribution(tx, ty, LogReg, probe=probe)
    guard_saw = []
    for step, before, deltas in rounds:
        assert background.updates_applied(step, before, deltas, key=step) is None
        guard_saw.append(probe.per_digit(model))  # the guard's turn on the shared probe, meanwhile
        background.evaluate_global(step, None)
    assert background.helped_and_hurt() == in_line.helped_and_hurt()
    assert {n: v.tolist() for n, v in background.totals.items()} == {n: v.tolist() for n, v in in_line.totals.items()}
    assert background.by_step == in_line.by_step and background.evaluations == in_line.evaluations == 3 * 4
    assert all(np.array_equal(seen, guard_saw[0]) for seen in guard_saw)
    assert len(background.state()["snapshots"]) == 3 * 3  # a snapshot per step, after its updates


def test_the_global_model_an_update_is_applied_to_is_scored_from_the_test_evaluation_with_the_same_figures(mnist):
    """The run's test-set evaluation of a global model hands its predictions to the probes: the
    attribution of the updates applied to that model makes no probe pass for it, and every figure
    equals the one computed with the pass (LeNet, the seeds' CNN, trained a few steps)."""
    from flwr.app import ArrayRecord

    from flmnist.ml.models import LeNet
    from flmnist.observers.evaluation import DigitEvaluation
    from flmnist.observers.probe import Probes

    (x, y), (tx, ty) = mnist
    torch.manual_seed(0)
    net = LeNet()
    train(net, x[:2000], y[:2000], batch_size=32, lr=0.05, steps=15, generator=torch.Generator().manual_seed(0))
    before = weights_of(net)
    deltas = []
    for n, group in enumerate(GROUPS):
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in before.items()})
        mask = torch.isin(y, torch.tensor(group))
        train(net, x[mask][:640], y[mask][:640], batch_size=32, lr=0.05, steps=10, generator=torch.Generator().manual_seed(n))
        deltas.append((f"node {n}", {k: weights_of(net)[k] - before[k] for k in before}))

    probes = Probes(tx, ty, LeNet)
    shared = Attribution(tx, ty, LeNet, probe=probes(1000, 250))
    digits = DigitEvaluation(tx, ty, LeNet, num_rounds=1, printer=lambda line: None, batch_size=250, probes=probes)
    digits.evaluate_global(0, ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in before.items()}))
    alone = Attribution(tx, ty, LeNet, probe_size=1000, batch_size=250)
    assert shared.attribute(1, before, deltas, key=1) == alone.attribute(1, before, deltas, key=1)
    assert (shared.evaluations, shared.reused, alone.evaluations, alone.reused) == (3, 1, 4, 0)
    assert {n: v.tolist() for n, v in shared.totals.items()} == {n: v.tolist() for n, v in alone.totals.items()}
    assert shared.label_share.tolist() == alone.label_share.tolist() and shared.by_step == alone.by_step
    assert shared.finish()["global_models_reused"] == 1

    changed = {k: v.copy() for k, v in before.items()}
    changed["fc2.bias"][0] += 1e-3  # other weights: scored with a probe pass of their own
    assert probes(1000).known_scores(changed) is None and probes(1000).known_scores(before) is not None


def test_a_sign_flipping_node_is_the_one_that_hurt_every_digit(mnist, tmp_path):
    """Four IID nodes on a partly trained model; node 3 sends its update reversed and scaled by 5
    (flmnist.client.faults' sign-flip, which the screen's default norm bound lets through)."""
    (x, y), (tx, ty) = mnist
    torch.manual_seed(0)
    start = weights_of(LogReg())
    start = {k: start[k] + trained_delta(start, x[:2000], y[:2000], steps=10)[k] for k in start}
    lines = []
    hook = Attribution(tx, ty, LogReg, probe_size=1000, run_dir=tmp_path, printer=lines.append)
    deltas = [(f"node {n}", trained_delta(start, x[4000 * n + 2000:4000 * n + 6000], y[4000 * n + 2000:4000 * n + 6000]))
              for n in range(4)]
    deltas[3] = ("node 3", {k: -5 * v for k, v in deltas[3][1].items()})
    hook.updates_applied(1, start, deltas, key=1)
    hook.evaluate_global(1, None)
    helped, hurt = hook.helped_and_hurt()
    assert all(hurt[d] == "node 3" for d in range(10)), hook.totals
    assert all(helped[d] != "node 3" for d in range(10)) and (hook.totals["node 3"] < 0).all()
    summary = hook.finish(wall_time=10.0)
    assert summary["hurt_most"] == {str(d): "node 3" for d in range(10)} and summary["probe_size"] == 1000
    assert all(f"  digit {d}: helped most by " in line and "hurt most by node 3 (-" in line
               for d, line in zip(range(10), lines[1:])), lines
    csv = (tmp_path / "attribution.csv").read_text().splitlines()
    assert csv[0] == "step,node,updates," + ",".join(f"digit_{d}" for d in range(10)) + ",total"
    assert [line.split(",")[1] for line in csv[1:]] == [f"node {n}" for n in range(4)]
    assert (tmp_path / "attribution.png").is_file()


def test_a_node_name_with_a_comma_keeps_attribution_csv_in_its_columns(mnist, tmp_path):
    """A deployed node names itself (node-name): "jetson, lab 2" is one quoted field, so every
    column stays under its header and the stopped-run plot reads it back."""
    import csv

    from flmnist.observers.stopped import plot_stopped_attribution

    (x, y), (tx, ty) = mnist
    torch.manual_seed(0)
    start = weights_of(LogReg())
    hook = Attribution(tx, ty, LogReg, probe_size=200, run_dir=tmp_path, printer=lambda line: None)
    hook.updates_applied(1, start, [("jetson, lab 2", trained_delta(start, x[:1000], y[:1000], steps=5)),
                                    ('node "b"', trained_delta(start, x[1000:2000], y[1000:2000], steps=5))], key=1)
    hook.evaluate_global(1, None)
    hook.finish(wall_time=1.0)
    with open(tmp_path / "attribution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["node"] for r in rows) == ["jetson, lab 2", 'node "b"'] and all(len(r) == 14 for r in rows)
    assert all(float(r["total"]) == pytest.approx(sum(float(r[f"digit_{d}"]) for d in range(10)), abs=0.06)
               for r in rows)
    (tmp_path / "attribution.png").unlink()
    plot_stopped_attribution(tmp_path)
    assert (tmp_path / "attribution.png").is_file()


class ScoredProbe:
    """A probe whose "model" is its scores: ``acc`` (per-digit accuracy) and ``share`` (the share
    of the probe images labelled with each digit) are the weights, an update adds to them."""

    size = 1000

    def scores(self, weights: dict, delta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        delta = delta or {"acc": 0.0, "share": 0.0}
        return weights["acc"] + delta["acc"], weights["share"] + delta["share"]

    def per_digit(self, weights: dict, delta: dict | None = None) -> np.ndarray:
        return self.scores(weights, delta)[0]

    def known_scores(self, weights: dict) -> None:
        return None  # no test-set evaluation handed any over


def scores(**digits) -> np.ndarray:
    out = np.zeros(10)
    for d, v in digits.items():
        out[int(d[1:])] = v
    return out


def test_a_digit_no_update_raised_says_whether_the_model_was_guessing_it(tmp_path):
    """Seed 002 for 5 rounds: the untrained LeNet labels 79% of all probe images 2, so it scores 81%
    on digit 2 by guessing; node 0 (holding 0-3) teaches 0, 1 and 3, which takes some guesses
    away, and nodes 1 and 2 alone forget 2: no node helped 2. The line says why, in numbers; a
    digit no update raised without such guessing keeps the plain reason."""
    lines = []
    hook = Attribution(None, None, None, run_dir=tmp_path, printer=lines.append, probe=ScoredProbe())
    model = {"acc": scores(d2=0.81), "share": scores(d0=0.18, d2=0.79, d6=0.03)}
    deltas = [("node 0", {"acc": scores(d0=0.5, d1=0.6, d2=-0.03, d3=0.4, d7=0.1), "share": scores(d2=-0.2)}),
              ("node 1", {"acc": scores(d2=-0.81, d4=0.9, d7=0.05), "share": scores(d2=-0.79)}),
              ("node 2", {"acc": scores(d2=-0.81, d7=-0.1, d8=0.7, d9=0.6), "share": scores(d2=-0.79)})]
    hook.updates_applied(1, model, deltas, key=1)
    hook.evaluate_global(1, None)
    later = {"acc": scores(d2=0.9), "share": scores(d2=0.3)}  # still guessing 2, less: the largest share counts
    hook.updates_applied(2, later, [("node 0", {"acc": scores(d2=-0.05), "share": scores()})], key=2)
    summary = hook.finish(wall_time=10.0)
    digit = {int(line.split()[1].rstrip(":")): line for line in lines[1:]}
    assert digit[2] == (
        "  digit 2: helped most by no node, hurt most by node 1 (-81.0 pp over 1 update, -81.0 each) (no update "
        "alone raised it: the global model that round 1's updates were applied to labelled 79% of all probe images 2 "
        "(about 10% once it knows the digits), so it scored on 2 by guessing; every update, its holder's too, takes "
        "guesses away until the model stops guessing, which a longer run reaches)"), digit[2]
    assert digit[5].endswith("helped most by no node, hurt most by no node (no update alone raised it: the model "
                             "knew it already when the updates came, or each update alone made it forget)"), digit[5]
    assert digit[0].startswith("  digit 0: helped most by node 0 (+50.0 pp over 2 updates, +25.0 each)"), digit[0]
    assert "guessing" not in digit[0] and "guessing" not in digit[5]
    assert summary["guessing"] == {"2": {"share": 0.79, "step": 1}} and summary["helped_most"]["2"] is None
    resumed = Attribution(None, None, None, printer=lines.append, probe=ScoredProbe(), unit="server update")
    resumed.load_state(hook.state())  # a checkpoint keeps what was seen
    assert resumed.guessing() == {2: (0.79, 1)}
    assert "the global model that server update 1's updates were applied to labelled 79%" in resumed.no_helper(2)


# ----------------------------------------------------------------------- real runs

BASE = ["checkpoint_every=0", "data.holdout_fraction=0.02", "sampling.fraction_evaluate=0.0"]
RUNS = {
    # seed 002's three disjoint digit groups, 3 rounds, stopping when the target is reached
    "sync": ["experiment=seed002", "num_rounds=3", "eval.update_rounds=[]", "eval.rounds=[]"],
    # one node of four flips its updates' sign; FedAsync mixes each update in on its own. The
    # effect guard is off so that its updates are applied and attribution has them to judge.
    "async": ["screen.guard_max_harm=null", "model=logreg", "num_nodes=4", "strategy=fedasync", "fleet=homogeneous", "client.local_steps=20",
              "client.lr=0.1", "client.momentum=0", "client.fault=sign-flip", "client.fault_nodes=[3]",
              "screen.clip_to_median=1.0", "async_loop.max_server_updates=40", "async_loop.eval_every=4",
              "target_accuracy=0.7",
              "stop_at_target=true"],
}


def flwr_run(tmp_path: Path, name: str) -> dict:
    run_dir = tmp_path / name
    nodes = 3 if name == "sync" else 4
    log = tmp_path / f"{name}.log"
    run_flwr(REPO, [*RUNS[name], *BASE, f"run_dir={run_dir}"], nodes, tempfile.mkdtemp(prefix="flmnist-test-home-"),
             log_path=log, timeout=900, backend="inprocess")
    assert (run_dir / "summary.json").is_file(), log.read_text()[-3000:]
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "dir": run_dir, "log": log.read_text()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root):
    tmp = tmp_path_factory.mktemp("attribution")
    with ThreadPoolExecutor(2) as pool:  # side by side: own FLWR_HOME and ports each
        return dict(zip(RUNS, pool.map(lambda name: flwr_run(tmp, name), RUNS)))


@pytest.mark.slow
def test_a_sync_run_credits_each_digit_group_to_its_node(runs):
    run = runs["sync"]
    attribution = run["summary"]["attribution"]
    for node, group in enumerate(GROUPS):
        for d in group:
            assert attribution["helped_most"][str(d)] == f"node {node}", attribution
    rows = (run["dir"] / "attribution.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3  # a snapshot per round
    assert (run["dir"] / "attribution.png").is_file()
    assert "digit 0: helped most by node 0" in run["log"]
    assert attribution["seconds"] > 0 and 0 < attribution["share_of_wall_time"] < 1, attribution  # its cost
    # the initial model, evaluated on the test set (round 0): scored from that, no probe pass; round 1's
    # model (eval.every=null, eval.rounds=[]: no test-set evaluation) from the effect guard's pass over
    # its aggregate of round 1's updates, which it probed (seed 002's groups point apart from an
    # untrained model), round 2's (not probed) with a pass of its own
    guard = run["summary"]["screen"]["guard"]
    assert guard["probed"] == 1 and guard["evaluations"] == 4, guard
    # the aggregate with all three whole; the three without stopped (after a tenth of each digit at least) or whole
    images = guard["probe_images_evaluated"]
    assert 1000 + 3 * 100 <= images <= 4000, guard
    assert (f"Effect guard (screen.guard_max_harm=2): 9 updates judged, probed 1 time (4 aggregates on {images:,} "
            "probe images") in run["log"]
    assert attribution["global_models_reused"] == 2 and attribution["evaluations"] == 3 * 3 + 1, attribution


@pytest.mark.slow
def test_an_async_run_singles_out_the_sign_flipping_node_and_stops_at_target(runs):
    run = runs["async"]
    summary = run["summary"]
    attribution = summary["attribution"]
    assert attribution["updates"].get("node 3", 0) >= 2, attribution
    assert sum(h == "node 3" for h in attribution["hurt_most"].values()) >= 9, attribution
    assert sum(attribution["totals"]["node 3"]) < 0 < min(sum(v) for n, v in attribution["totals"].items()
                                                         if n != "node 3"), attribution
    stopped = summary["stopped_early"]
    assert summary["status"] == "finished" and stopped["reason"] == "target accuracy reached", summary
    assert stopped["step"] < 40 and summary["rounds_completed"] == stopped["step"]
    assert stopped["accuracy"] >= 0.7 and summary["rounds_to_target"] == stopped["step"]
    assert (run["dir"] / "attribution.csv").is_file() and (run["dir"] / "attribution.png").is_file()
    assert "Stopped early after update" in run["log"]


def test_a_snapshot_of_a_step_taken_again_replaces_the_first(tmp_path):
    """A resumed run that evaluates its checkpoint's model again (stopped at its privacy budget
    before any round) snapshots that step a second time: attribution.csv keeps one table per step."""
    attribution = Attribution(None, None, None, run_dir=tmp_path, probe=object())
    attribution.totals, attribution.counts["node 0"] = {"node 0": np.arange(10.0)}, 1
    attribution.snapshot(1)
    attribution.snapshot(2)
    attribution.totals["node 0"] = attribution.totals["node 0"] + 1
    attribution.snapshot(2)
    assert [line.split(",")[0] for line in attribution.snapshots] == ["1", "2"]
    assert attribution.snapshots[-1].endswith(",55.00")


def test_the_guards_aggregate_is_flowers_global_model_so_attribution_reuses_its_probe_scores(mnist, task_identity):
    """Two rounds of seed 002's split through the real reply path and Flower's FedAvg (real
    Messages), uneven example counts: the effect guard's aggregate of a round's updates has the
    very values of the global model FedAvg makes of them, so the next round's attribution scores
    that model from the guard's probe pass instead of a pass of its own, with the same figures."""
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from flmnist.core.arrays import to_record, to_weights
    from flmnist.engine.effect_guard import EffectGuard
    from flmnist.engine.guard import Guarded
    from flmnist.engine.reply_path import ReplyPath
    from flmnist.observers.probe import Probe
    from flmnist.protocol.screen import NodeLimits, ReplyScreen, ScreenSettings
    from tests.test_async import SENT, train_reply

    (x, y), (tx, ty) = mnist
    examples = [97, 64, 31]  # shares that are no round binary fractions
    probe = Probe(tx, ty, LogReg, 1000, 250)
    attribution = Attribution(None, None, None, probe=probe)
    path = ReplyPath(ReplyScreen(ScreenSettings(), NodeLimits((100,) * 3, (10,) * 3)), SENT, hooks=[attribution],
                     guard=EffectGuard(probe))
    guarded = Guarded(FedAvg(min_available_nodes=3, min_train_nodes=3), path)

    class Nodes:
        def get_node_ids(self):
            return [1, 2, 3]

    torch.manual_seed(0)
    arrays, globals_, applied = to_record(weights_of(LogReg())), [], []
    for server_round in (1, 2):
        before = to_weights(arrays)
        replies, deltas = [], []
        sent = sorted(guarded.configure_train(server_round, arrays, ConfigRecord(), Nodes()),
                      key=lambda m: m.metadata.dst_node_id)  # node id i + 1 holds partition i
        for i, (msg, group, n) in enumerate(zip(sent, GROUPS, examples)):
            idx = torch.from_numpy(np.flatnonzero(np.isin(y.numpy(), group))[:n])
            delta = trained_delta(before, x[idx], y[idx], steps=20)
            model = {k: before[k] + delta[k] for k in before}
            deltas.append((f"node {i}", {k: model[k] - before[k] for k in before}))
            replies.append(train_reply(msg, to_record(model), n, i, SENT))
        arrays, _ = guarded.aggregate_train(server_round, replies[::-1])  # arrived in another order than summed
        assert isinstance(arrays, ArrayRecord)
        globals_.append(to_weights(arrays))
        applied.append((before, deltas))
    attribution.wait()
    assert path.guard.rejected == 0 and path.guard.probed == 2  # seed 002's groups point apart: probed
    assert probe.known_scores(globals_[0]) is not None  # the guard's aggregate, the global model bit for bit
    # round 1's "before" (the initial model) took a pass; round 2's (round 1's global model) none
    assert (attribution.reused, attribution.evaluations) == (1, 1 + 3 + 3)
    alone = Attribution(None, None, None, probe=Probe(tx, ty, LogReg, 1000, 250))
    for step, (before, deltas) in enumerate(applied, start=1):
        alone.attribute(step, before, deltas, key=step)
    assert (alone.reused, alone.evaluations) == (0, 2 + 3 + 3)
    assert {n: v.tolist() for n, v in attribution.totals.items()} == {n: v.tolist() for n, v in alone.totals.items()}
    assert attribution.by_step == alone.by_step and attribution.label_share.tolist() == alone.label_share.tolist()
