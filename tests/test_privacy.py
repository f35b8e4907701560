"""``privacy=central``: the noise is where and as large as the guarantee says, epsilon is the RDP
accountant's own figure for the releases made, the budget stops the run before the release that
would pass it, a resume continues the count, and a strategy the accountant cannot cover is
refused naming the setting. ``privacy=client``: the node clips, the screen rejects an update that
is not, the server noises and counts as central. ``privacy=local``: the node clips and noises,
each node's epsilon is dp-accounting's. ``privacy=central_adaptive``: the clip follows the paper's
rule and each round is one central release. ``privacy=dpsgd``: DP-SGD's noise and each node's epsilon."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.app import Message, MessageType, RecordDict
from test_engines import LIMITS, SENT, FakeGrid, FakeNode, make_path, record, sync_round

from flmnist.client.update_dp import update_dp_mod
from flmnist.core.arrays import to_weights
from flmnist.core.errors import ConfigError, RunFailed
from flmnist.engine.guard import Guarded
from flmnist.engine.privacy import AsyncPrivacy, strategy_problem, wrap_sync
from flmnist.protocol import messages as p
from flmnist.protocol.settings import PrivacySettings
from flmnist.strategies import FedAvg, FedBuff

FLMNIST = str(Path(sys.executable).parent / "flmnist")
DELTA = 1e-5
BIG = {"w": np.zeros(40_000, np.float32)}  # enough coordinates to measure the noise's std


def rdp_epsilon(noise_multiplier: float, releases: int, delta: float = DELTA, repeated=None) -> float:
    """Google's dp-accounting alone: ``releases`` Gaussian releases, no sampling amplification;
    ``repeated`` ({k: n}) of them at noise_multiplier / k (one node k times in a FedBuff buffer)."""
    accountant = RdpAccountant()
    repeated = {int(k): n for k, n in (repeated or {}).items()}
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), releases - sum(repeated.values())))
    for k, n in repeated.items():
        accountant.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier / k), n))
    return accountant.get_epsilon(delta)


def guarded(mechanism: str, wrap, sigma: float, clip: float, nodes: int = 4, **settings):
    """A private FedAvg round as run_setup builds it: ``wrap`` (wrap_sync, wrap_adaptive) around
    Flower's FedAvg, inside Guarded with a screen that has no cross-node defences; returns
    (guarded, accountant, reply path, wrapper)."""
    settings = PrivacySettings(mechanism, noise_multiplier=sigma, clipping_norm=clip, target_delta=DELTA, **settings)
    inner = FedAvg(min_available_nodes=nodes, min_train_nodes=nodes, fraction_evaluate=0.0)
    wrapper, accountant, per_round = wrap(inner, settings, nodes)
    path = make_path(max_norm_ratio=None, clip_to_median=None)
    return Guarded(wrapper, path, privacy=accountant, per_round=per_round), accountant, path, wrapper


def private_fedavg(sigma: float, clip: float, nodes: int = 4, max_epsilon: float | None = None):
    strategy, accountant, path, _ = guarded("central", wrap_sync, sigma, clip, nodes, max_epsilon=max_epsilon)
    return strategy, accountant, path


# ------------------------------------------------------------------ synchronous, unit level

def test_a_sync_round_adds_noise_of_std_sigma_clip_over_n_and_counts_one_release(task_identity):
    """Four nodes that move every coordinate by 1e-6 (updates of length 2e-4): the new model is
    the old one plus Gaussian noise of std noise_multiplier * clipping_norm / 4, and epsilon is one
    release's."""
    strategy, accountant, _ = private_fedavg(sigma=2.0, clip=0.5)
    arrays, _ = sync_round(strategy, {i + 11: FakeNode(i, 1e-6) for i in range(4)}, BIG)
    moved = arrays["w"].numpy()
    assert moved.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.03)
    assert abs(moved.mean()) < 0.01
    assert accountant.rdp.num_releases == 1
    assert accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 1), rel=1e-6)


def test_each_update_is_clipped_and_a_silent_node_counts_as_a_zero_update(task_identity):
    """Updates of length 200 (every coordinate +1) are clipped to 1; with one of four nodes silent
    the mean is 3/4 of a clipped update (the accountant needs exactly n of them), noise aside."""
    strategy, _, _ = private_fedavg(sigma=1e-3, clip=1.0)
    nodes = {11: FakeNode(0, 1.0), 12: FakeNode(1, 1.0), 13: FakeNode(2, 1.0), 14: FakeNode(3, 1.0, behave="silent")}
    arrays, _ = sync_round(strategy, nodes, BIG)
    clipped = 1.0 / np.sqrt(BIG["w"].size)  # one coordinate of an update clipped to length 1
    assert arrays["w"].numpy().mean() == pytest.approx(0.75 * clipped, rel=0.01)


def test_an_update_that_changes_nothing_counts_as_a_zero_update_not_a_failed_round(task_identity):
    """A node that sends back the model it was sent (nothing to train on, or hostile): Flower 1.41's
    clip divides by the update's norm, 0, and the whole round failed (ZeroDivisionError). Now it is
    the server's zero update: the mean is 3/4 of a clipped update, noise aside, and one release."""
    strategy, accountant, _ = private_fedavg(sigma=1e-3, clip=1.0)
    nodes = {11: FakeNode(0, 1.0), 12: FakeNode(1, 1.0), 13: FakeNode(2, 1.0), 14: FakeNode(3, 0.0)}
    arrays, _ = sync_round(strategy, nodes, BIG)
    clipped = 1.0 / np.sqrt(BIG["w"].size)
    assert arrays is not None and arrays["w"].numpy().mean() == pytest.approx(0.75 * clipped, rel=0.01)
    assert strategy.failed_rounds == 0 and accountant.rdp.num_releases == 1


def test_a_private_round_whose_updates_are_all_the_model_sent_fails_like_a_silent_one(task_identity):
    """Central DP, every node sending back the model it got: each became the server's zero update,
    a round identical to one where every node stayed silent, which fails; this one counted as
    advanced (a review)."""
    strategy, accountant, _ = private_fedavg(sigma=1e-3, clip=1.0)
    arrays, _ = sync_round(strategy, {i + 11: FakeNode(i, 0.0) for i in range(4)}, BIG)
    assert arrays is not None and accountant.rdp.num_releases == 1  # released: the noise moved it
    assert strategy.failed_rounds == 1
    with pytest.raises(RunFailed, match="the initial one plus the privacy noise"):
        strategy.liveness.check_some_advanced(1, before=False)


@pytest.mark.parametrize("mechanism", ["central", "client"])
@pytest.mark.parametrize("fault", ["nan", "silent"])
def test_a_round_with_no_usable_update_still_releases_noise_and_counts(task_identity, mechanism, fault):
    """Every sampled node's reply rejected or missing: the model moves by the noise alone (std
    sigma * C / n) and the release is counted. Released unchanged, it told a round whose nodes all
    failed from one whose update arrived, with certainty: no epsilon bounds that (a review). The
    round still counts as failed."""
    strategy, accountant, _, _ = guarded(mechanism, wrap_sync, sigma=2.0, clip=0.5)
    arrays, metrics = sync_round(strategy, {i + 11: FakeNode(i, 0.01, behave=fault) for i in range(4)}, BIG)
    moved = arrays["w"].numpy()
    assert moved.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.03) and abs(moved.mean()) < 0.01
    assert metrics is None
    assert accountant.rdp.num_releases == 1 and accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 1), rel=1e-6)
    assert strategy.failed_rounds == 1
    with pytest.raises(RunFailed, match="the global model is the initial one plus the privacy noise"):
        strategy.liveness.check_some_advanced(1, before=False)


def test_the_budget_stops_before_the_round_that_would_pass_it(task_identity):
    """max_epsilon between two and three releases' epsilon: the path is told to stop after round 2."""
    budget = (rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2
    strategy, accountant, path = private_fedavg(sigma=1.0, clip=1.0, max_epsilon=budget)
    nodes = {i + 11: FakeNode(i, 0.01) for i in range(4)}
    sync_round(strategy, nodes, BIG, server_round=1)
    assert path.stopped is None
    sync_round(strategy, nodes, BIG, server_round=2)
    assert path.stopped == (2, "privacy budget")
    assert accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 2), rel=1e-6)
    assert accountant.epsilon < budget


def test_a_budget_below_one_release_is_a_config_error_before_training(task_identity):
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=0.5 is less than one release spends"):
        private_fedavg(sigma=1.0, clip=1.0, max_epsilon=0.5)


@pytest.mark.parametrize("strategy, message", [
    (FedAvg(server_learning_rate=0.5), "use strategy.server_learning_rate=1.0 strategy.server_momentum=0.0"),
    (FedBuff(server_momentum=0.9), "use strategy.server_momentum=0.0 under privacy=central"),
])
def test_a_strategy_the_accountant_cannot_cover_is_refused_naming_the_setting(strategy, message):
    assert message in strategy_problem(strategy)


def test_robust_aggregators_are_refused_with_the_reason():
    from flwr.serverapp.strategy import FedMedian, Krum

    for strategy in (FedMedian(), Krum()):
        assert "no epsilon can be accounted" in strategy_problem(strategy)


# ------------------------------------------------------------------ asynchronous, unit level

def test_fedbuffs_release_gets_noise_of_std_sigma_clip_over_k_and_one_release_per_buffer():
    settings = PrivacySettings("central", noise_multiplier=1.5, clipping_norm=2.0, target_delta=DELTA)
    dp = AsyncPrivacy(settings, num_nodes=8)
    strategy = FedBuff(buffer_size=4, server_learning_rate=1.0, server_momentum=0.0)
    before = {"w": np.zeros(40_000, np.float32)}
    after = {"w": np.full(40_000, 0.01, np.float32)}
    for name in ("node 0", "node 1", "node 2", "node 3"):
        dp.prepare(strategy, name, after, before)
    released = dp.released(strategy, before, after)["w"] - after["w"]
    assert released.std() == pytest.approx(1.5 * 2.0 / 4, rel=0.03)
    assert dp.accountant.epsilon == pytest.approx(rdp_epsilon(1.5, 1), rel=1e-6)


def test_a_node_twice_in_one_buffer_is_accounted_at_its_true_noise_multiplier():
    settings = PrivacySettings("central", noise_multiplier=2.0, clipping_norm=1.0, target_delta=DELTA)
    dp = AsyncPrivacy(settings, num_nodes=8)
    strategy = FedBuff(buffer_size=4, server_learning_rate=1.0, server_momentum=0.0)
    zero = {"w": np.zeros(10, np.float32)}
    for name in ("node 0", "node 0", "node 1", "node 2"):
        dp.prepare(strategy, name, zero, zero)
    dp.released(strategy, zero, zero)
    assert dp.accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 1), rel=1e-6)  # sensitivity 2C: sigma / 2
    assert dp.accountant.summary()["repeated_releases"] == {"2": 1}  # the summary says so
    restored = AsyncPrivacy(settings, num_nodes=8)
    restored.load_state_dict(dp.state_dict())  # and a resumed run still knows
    assert restored.accountant.summary()["repeated_releases"] == {"2": 1}


def test_fedasync_clips_the_move_and_noises_each_update():
    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=0.5, target_delta=DELTA)
    dp = AsyncPrivacy(settings, num_nodes=4)
    current = {"w": np.zeros(40_000, np.float32)}
    arrived = {"w": np.full(40_000, 3.0, np.float32)}  # length 600, clipped to 0.5
    sent = dp.prepare(type("FedAsyncLike", (), {"reply_delta": False})(), "node 0", arrived, current)["w"]
    assert sent.mean() == pytest.approx(0.5 / np.sqrt(40_000), abs=0.01)
    assert sent.std() == pytest.approx(0.5, rel=0.03)
    assert dp.accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 1), rel=1e-6)


def checkpointed_at_budget() -> tuple[float, dict, dict]:
    """A private FedAvg run of 4 nodes whose budget allows 2 rounds, checkpointed after round 2:
    (the budget, the nodes, the checkpoint)."""
    from flmnist.observers.checkpoint import rng_state

    budget = (rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2
    strategy, _, path = private_fedavg(sigma=1.0, clip=1.0, max_epsilon=budget)
    nodes = {i + 11: FakeNode(i, 0.01) for i in range(4)}
    sync_round(strategy, nodes, BIG, server_round=1)
    sync_round(strategy, nodes, BIG, server_round=2)
    return budget, nodes, {"engine": strategy.state_dict(), "screen": path.state(), "rng": rng_state(), "round": 2}


def test_a_resumed_run_at_its_budget_sends_no_round(task_identity):
    """Stopped at its budget after round 2, then extended (num_rounds=4) without a larger budget:
    the resumed run stops before round 3 (it was sent unchecked and spent past max_epsilon; under
    central DP Flower's wrapper then raised)."""
    from flmnist.engine.sync import SyncEngine

    budget, nodes, checkpoint = checkpointed_at_budget()
    resumed, again, path2 = private_fedavg(sigma=1.0, clip=1.0, max_epsilon=budget)
    grid = FakeGrid(nodes)
    SyncEngine(grid, resumed, path2, SENT.to_record(), num_rounds=4).run(record(BIG), checkpoint)
    assert grid.trained(11) == 0 and path2.stopped == (2, "privacy budget")
    assert again.epsilon == pytest.approx(rdp_epsilon(1.0, 2), rel=1e-6) and again.epsilon <= budget


def test_a_run_stopped_at_its_budget_as_it_resumes_evaluates_the_checkpoints_model(task_identity, tmp_path):
    """The privacy ledger ran ahead of the checkpoint (killed in round 3 after its release was
    recorded; DP-SGD's stricter check at resume), so the resumed run stops before any round. Round 2,
    checkpointed but not in the evaluation schedule, is the final model and nothing evaluated it:
    final_accuracy came from an earlier round (a review). It is evaluated now, unless it was."""
    from test_engines import Spy

    from flmnist.engine.sync import SyncEngine
    from flmnist.observers.recorder import RunRecorder

    budget, nodes, checkpoint = checkpointed_at_budget()
    for evaluated in (False, True):
        resumed, _, path2 = private_fedavg(sigma=1.0, clip=1.0, max_epsilon=budget)
        spy = Spy()
        path2.hooks = [spy]
        path2.recorder = RunRecorder(tmp_path / str(evaluated), 4, 0.99, printer=lambda line: None)
        path2.recorder.add(1, test_accuracy=0.5)
        path2.recorder.add(2, train_loss=0.1, **({"test_accuracy": 0.6} if evaluated else {}))
        SyncEngine(FakeGrid(nodes), resumed, path2, SENT.to_record(), num_rounds=4).run(record(BIG), checkpoint)
        assert path2.stopped == (2, "privacy budget")
        assert [step for step, _ in spy.models] == ([] if evaluated else [2])


def test_a_resume_counts_the_releases_made_after_its_checkpoint(task_identity, tmp_path):
    """FedAsync with central DP, evaluated (and so checkpointed) every 5 server updates, crashes
    after 7: resumed from the update-5 checkpoint, its accountant counts 7 releases, not 5 (the
    two noised models after the checkpoint had gone out to the nodes; they were forgotten)."""
    from flmnist.engine.async_loop import AsyncLoop
    from flmnist.observers.checkpoint import load_checkpoint
    from flmnist.observers.recorder import RunRecorder
    from flmnist.protocol.settings import AsyncLoopSettings
    from flmnist.strategies import FedAsync

    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=DELTA)

    def loop(updates: int) -> AsyncLoop:
        path = make_path()
        path.recorder, path.checkpoint_every = RunRecorder(tmp_path, updates, 0.99, printer=lambda line: None), 1
        return AsyncLoop(FakeGrid({11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}), FedAsync(alpha=0.5), path,
                         AsyncLoopSettings(max_server_updates=updates, eval_every=5, update_timeout=5.0, prefetch=0),
                         poll_interval=0.001, privacy=AsyncPrivacy(settings, 2))

    first = loop(7)
    first.run(record(BIG))
    assert first.privacy.accountant.rdp.num_releases == 7
    at_5 = load_checkpoint(tmp_path / "checkpoint.prev.pt")  # as if the run had died before its last one
    assert at_5["round"] == 5
    resumed = loop(9)
    resumed.transport.discover(1.0)
    resumed.restore(at_5)
    assert resumed.privacy.accountant.rdp.num_releases == 7
    assert resumed.privacy.accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 7), rel=1e-6)


def test_a_stale_fedasync_update_moves_the_release_by_at_most_the_clip_with_or_without_its_nodes_data(task_identity):
    """FedAsync under central DP clipped an arriving model against the current global model: for a
    stale update (staleness 1 here) a node's data moved the release by up to twice the clip (the
    drift between the two models is public), and epsilon was that of half the noise multiplier (a
    review). Two runs, noise off, differing only in the stale node's data (it trains; it returns
    the model it got, as a node without data would): the released models differ by alpha x clip."""
    from flmnist.engine.async_loop import AsyncLoop
    from flmnist.protocol.settings import AsyncLoopSettings
    from flmnist.strategies import FedAsync
    from flmnist.strategies.staleness import Constant

    class NoNoise:
        def normal(self, mean, std, shape):
            return np.zeros(shape)

    def released(stale_offset: float) -> np.ndarray:
        settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=DELTA)
        dp = AsyncPrivacy(settings, 2)
        dp.rng = NoNoise()
        nodes = {11: FakeNode(0, 0.01, behave=lambda k: "honest" if k == 1 else "silent"),
                 12: FakeNode(1, stale_offset, delay=0.2)}  # trained from version 0, arrives after version 1
        loop = AsyncLoop(FakeGrid(nodes), FedAsync(alpha=0.5, staleness=Constant()), make_path(guard_max_harm=None),
                         AsyncLoopSettings(max_server_updates=2, update_timeout=5.0, prefetch=0), poll_interval=0.001,
                         privacy=dp)
        return to_weights(loop.run(record(BIG)))["w"]

    moved = np.linalg.norm(released(0.02) - released(0.0))
    assert moved == pytest.approx(0.5 * 1.0, rel=1e-3)  # alpha x clip: before the fix, 0.75 (1.5 clips)


def test_a_checkpoint_from_before_the_accountants_own_state_still_loads():
    """Checkpoints written on 2026-12-04 held Flower's RdpAccountant state itself, not
    {"rdp": ..., "repeated": ...}: loading one raised a bare KeyError 'rdp'. It loads, with the
    budget the resume gives, and counts on from its releases."""
    from flmnist.engine.privacy import Accountant

    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=DELTA, max_epsilon=8.0)
    old = Accountant(settings, 4)
    for _ in range(3):
        old.compose(4)
    resumed = Accountant(dataclasses.replace(settings, max_epsilon=16.0), 4)
    resumed.load_state_dict(old.rdp.state_dict())  # the old layout
    assert resumed.epsilon == pytest.approx(old.epsilon) and resumed.epsilon == pytest.approx(rdp_epsilon(1.0, 3), rel=1e-4)
    assert resumed.settings.max_epsilon == 16.0 and not resumed.repeated


def test_a_resumed_run_draws_noise_nobody_can_regenerate_from_its_checkpoint():
    """The checkpoint keeps the accountant, not the noise generator's state (it did: anyone with
    checkpoint.pt could regenerate the noise of later releases and subtract it, and a resumed
    attempt drew the same noise as the interrupted one, over other updates)."""
    from flmnist.observers.checkpoint import _pack, _unpack

    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=0.5, target_delta=DELTA)
    fedasync = type("FedAsyncLike", (), {"reply_delta": False})()
    current, arrived = {"w": np.zeros(1000, np.float32)}, {"w": np.full(1000, 0.001, np.float32)}
    dp = AsyncPrivacy(settings, num_nodes=4)
    dp.prepare(fedasync, "node 0", arrived, current)
    state = _unpack(_pack(dp.state_dict()))
    assert set(state) == {"accountant", "pending"}
    first, second = AsyncPrivacy(settings, 4), AsyncPrivacy(settings, 4)
    first.load_state_dict(state), second.load_state_dict(state)
    assert first.accountant.epsilon == second.accountant.epsilon == dp.accountant.epsilon
    a, b = (x.prepare(fedasync, "node 0", arrived, current)["w"] for x in (first, second))
    assert not np.array_equal(a, b)


# ------------------------------------------------------------------ the command, real runs

def flmnist(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    return subprocess.run([FLMNIST, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def rows(run_dir: Path) -> list[dict]:
    return [r for r in json.loads((run_dir / "metrics.json").read_text()) if r.get("epsilon") is not None]


@pytest.mark.slow
def test_a_private_run_reports_epsilon_each_round_and_stops_at_its_budget(tmp_path):
    """4 rounds asked, max_epsilon between the 2nd and 3rd release's epsilon: 2 rounds run, exit 0,
    the summary says why, and each round's epsilon is the accountant's for that many releases;
    resumed with a larger budget (the README's `flmnist resume=DIR privacy.max_epsilon=16`), it trains
    its other 2 rounds and counts 4 releases."""
    budget = round((rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2, 3)
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=4", "privacy=central",
                   f"privacy.max_epsilon={budget}", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Strategy FedAvg with central DP" in proc.stderr + proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["stopped_early"]["reason"] == "privacy budget"
    assert summary["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 2), rel=1e-4)
    assert [r["epsilon"] for r in rows(run)] == pytest.approx([rdp_epsilon(1.0, k) for k in (1, 2)], rel=1e-4)
    assert (run / "accuracy_epsilon.png").is_file()
    # a larger budget on resume: the run goes on to its 4 rounds, the accountant counting on
    larger = round(rdp_epsilon(1.0, 4) + 1, 3)
    proc = flmnist(tmp_path, f"resume={run}", f"privacy.max_epsilon={larger}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 4 and not summary.get("stopped_early"), summary.get("stopped_early")
    assert summary["privacy"]["releases"] == 4 and summary["privacy"]["max_epsilon"] == larger
    assert summary["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 4), rel=1e-4)


@pytest.mark.slow
def test_the_effect_guard_set_back_on_under_central_dp_weighs_updates_as_the_dp_average_does(tmp_path):
    """privacy=central averages with equal weights; a guard turned back on weighed updates by their
    claimed examples (set before the DP wrapper changed the weighting): one claiming 1 example was
    judged at 1/total of the aggregate and counted 1/K in it. The run warns that epsilon no longer
    holds, and its guard weighs equally."""
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=1", "privacy=central",
                   "screen.guard_max_harm=2", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with screen.guard_max_harm on" in proc.stderr + proc.stdout
    assert json.loads((run / "summary.json").read_text())["screen"]["guard"]["weights"] == "equal"


@pytest.mark.slow
def test_an_extended_private_run_goes_on_counting_from_its_releases(tmp_path):
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=2", "privacy=central", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = flmnist(tmp_path, f"resume={run}", "num_rounds=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["privacy"]["releases"] == 3
    assert summary["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, 3), rel=1e-4)


@pytest.mark.slow
def test_a_private_fedbuff_run_accounts_one_release_per_server_update(tmp_path):
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "strategy=fedbuff", "async_loop.max_client_updates=8",
                   "privacy=central", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    releases = summary["privacy"]["releases"]
    assert releases == summary["async"]["server_updates"] >= 1
    # which releases had one node twice in the buffer depends on timing: the summary says which
    repeated = summary["privacy"]["repeated_releases"]
    assert summary["privacy"]["epsilon"] == pytest.approx(rdp_epsilon(1.0, releases, repeated=repeated), rel=1e-4)


def test_a_robust_aggregator_under_privacy_is_one_line_exit_2(tmp_path):
    proc = flmnist(tmp_path, "strategy=fedmedian", "privacy=central")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("flmnist: error: strategy FedMedian aggregates otherwise than FedAvg"), proc.stderr


# ------------------------------------------------------------------ privacy=dpsgd

def test_dpsgd_clips_each_images_gradient_and_adds_noise_of_std_sigma_clip_over_batch():
    """One DP-SGD step at lr 1 on blank images: the weights' gradients are zero, so their change
    is the noise alone, std sigma * C / expected batch size; the bias moves by at most C (clipped)
    plus noise."""
    import torch

    from flmnist.ml.dpsgd import train_dpsgd
    from flmnist.ml.models import LogReg

    model = LogReg()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.zeros(64, 1, 28, 28), torch.arange(64) % 10
    train_dpsgd(model, images, labels, steps=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0,
                noise_multiplier=3.0, clipping_norm=2.0, dev=torch.device("cpu"))
    moved = {k: (model.state_dict()[k] - before[k]).flatten() for k in before}
    weight = next(k for k in moved if k.endswith("weight"))
    assert moved[weight].std().item() == pytest.approx(3.0 * 2.0 / 64, rel=0.05)
    assert not model._forward_hooks and not hasattr(model, "_module")  # Opacus's hooks are gone


def test_dpsgd_clips_each_images_gradient_to_the_clipping_norm():
    """Blank images all labelled 0: each image's gradient is the bias's alone, softmax(b) - e_0, of
    norm about 0.95, all pointing the same way. Clipped to C = 0.1 each and averaged over the batch
    (no noise), the bias moves by exactly C at lr 1; plain SGD on the same batch, about 9x as far."""
    import torch

    from flmnist.ml.dpsgd import train_dpsgd
    from flmnist.ml.models import LogReg
    from flmnist.ml.training import train

    torch.manual_seed(0)
    start = LogReg().state_dict()
    images, labels = torch.zeros(64, 1, 28, 28), torch.zeros(64, dtype=torch.long)
    moved = {}
    for how in ("dpsgd", "sgd"):
        model = LogReg()
        model.load_state_dict(start)
        if how == "dpsgd":
            train_dpsgd(model, images, labels, steps=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0,
                        noise_multiplier=0.0, clipping_norm=0.1, dev=torch.device("cpu"))
        else:
            train(model, images, labels, batch_size=64, lr=1.0, steps=1, generator=torch.Generator().manual_seed(0))
        bias = next(k for k in start if k.endswith("bias"))
        moved[how] = (model.state_dict()[bias] - start[bias]).norm().item()
    assert moved["dpsgd"] == pytest.approx(0.1, rel=1e-4)
    assert moved["sgd"] > 5 * moved["dpsgd"]


def test_dpsgd_on_a_node_with_fewer_images_than_a_batch_steps_as_plain_sgd_would():
    """20 images, batch_size 64: every step takes all 20 (q = 1), and the step is their mean
    gradient, as plain SGD's, with no noise and a clip nobody reaches (it was divided by 64: a
    third of the learning rate)."""
    import torch
    import torch.nn.functional as F

    from flmnist.ml.dpsgd import train_dpsgd
    from flmnist.ml.models import LogReg

    torch.manual_seed(0)
    images, labels = torch.rand(20, 1, 28, 28), torch.arange(20) % 10
    private, plain = LogReg(), LogReg()
    plain.load_state_dict(private.state_dict())
    train_dpsgd(private, images, labels, steps=1, batch_size=64, lr=0.1, momentum=0.0, weight_decay=0.0,
                noise_multiplier=0.0, clipping_norm=1e6, dev=torch.device("cpu"))
    F.nll_loss(plain(images), labels).backward()
    with torch.no_grad():
        for param in plain.parameters():
            param -= 0.1 * param.grad
    for k, v in plain.state_dict().items():
        assert torch.allclose(private.state_dict()[k], v, atol=1e-6), k


def test_dpsgd_noise_is_not_the_servers_to_regenerate_and_an_empty_sample_still_gets_it(monkeypatch):
    """The same model, data and seeds the server sent, twice: different noise (it came from the
    run's seed: the server could regenerate and subtract it). A step whose Poisson sample is
    empty moves the weights by the noise alone (it was skipped: no noise, while the accountant
    counted a noised step)."""
    import torch

    from flmnist.ml.dpsgd import train_dpsgd
    from flmnist.ml.models import LogReg

    images, labels = torch.zeros(64, 1, 28, 28), torch.arange(64) % 10
    moved = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LogReg()
        train_dpsgd(model, images, labels, steps=1, batch_size=64, lr=1.0, momentum=0.0, weight_decay=0.0,
                    noise_multiplier=3.0, clipping_norm=2.0, dev=torch.device("cpu"))
        moved.append({k: v.clone() for k, v in model.state_dict().items()})
    assert any(not torch.equal(moved[0][k], moved[1][k]) for k in moved[0])
    torch.manual_seed(0)
    model = LogReg()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(torch, "rand", lambda n, generator=None: torch.ones(n))  # every image left out
    mean_loss, trace = train_dpsgd(model, images, labels, steps=1, batch_size=64, lr=1.0, momentum=0.0,
                                   weight_decay=0.0, noise_multiplier=3.0, clipping_norm=2.0, dev=torch.device("cpu"))
    step = torch.cat([(model.state_dict()[k] - start[k]).flatten() for k in start])
    assert trace == [] and step.std().item() == pytest.approx(3.0 * 2.0 / 64, rel=0.05)
    assert mean_loss == 0.0  # it was NaN, and the server's screen refused the honest reply (a review)


def test_each_nodes_dpsgd_epsilon_is_the_poisson_subsampled_rdp_figure():
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent

    from flmnist.engine.privacy import SampleAccountant
    from flmnist.protocol.messages import TrainSettings

    sent = TrainSettings(model={}, partition={}, num_partitions=2, seed=0, holdout_fraction=0.1, local_steps=7,
                         batch_size=16, dp_noise_multiplier=1.1, dp_clipping_norm=1.0)
    settings = PrivacySettings("dpsgd", noise_multiplier=1.1, clipping_norm=1.0, target_delta=DELTA)
    accountant = SampleAccountant(settings, sent, train_examples=(400, 1600))
    for _ in range(3):
        accountant.task(0, "node 0")
    accountant.task(1, "node 1")
    expected = {}
    for part, n, tasks in ((0, 400, 3), (1, 1600, 1)):
        rdp = RdpAccountant()
        rdp.compose(SelfComposedDpEvent(PoissonSampledDpEvent(16 / n, GaussianDpEvent(1.1)), 7 * tasks))
        expected[f"node {part}"] = rdp.get_epsilon(DELTA)
    summary = accountant.summary()
    assert summary["per_node"] == pytest.approx(expected, rel=1e-4)
    assert summary["epsilon"] == pytest.approx(max(expected.values()), rel=1e-4)
    assert expected["node 0"] > expected["node 1"]  # more steps on fewer images: more spent
    # a task whose node id has not replied counts against every partition, in per_node too
    # (epsilon was larger than every per_node figure the docs call it the largest of)
    accountant.unattributed = 1
    summary = accountant.summary()
    assert summary["per_node"] == pytest.approx({"node 0": accountant.epsilon_of(0, 4),
                                                 "node 1": accountant.epsilon_of(1, 2)}, rel=1e-4)
    assert summary["epsilon"] == pytest.approx(max(summary["per_node"].values()), rel=1e-4)


def test_a_dpsgd_budget_below_one_task_is_a_config_error():
    from flmnist.engine.privacy import SampleAccountant
    from flmnist.protocol.messages import TrainSettings

    sent = TrainSettings(model={}, partition={}, num_partitions=1, seed=0, holdout_fraction=0.1, local_steps=50,
                         batch_size=32, dp_noise_multiplier=0.5, dp_clipping_norm=1.0)
    settings = PrivacySettings("dpsgd", noise_multiplier=0.5, clipping_norm=1.0, max_epsilon=0.1)
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=0.1 is less than one training task spends"):
        SampleAccountant(settings, sent, train_examples=(100,)).check_first_release()


@pytest.mark.slow
def test_a_dpsgd_run_counts_every_nodes_epsilon(tmp_path):
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=2", "client.local_steps=5", "privacy=dpsgd",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Strategy FedAvg with DP-SGD on the nodes" in proc.stderr + proc.stdout
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert privacy["mechanism"] == "dpsgd" and privacy["releases"] == 8
    assert sorted(privacy["per_node"]) == ["node 0", "node 1", "node 2", "node 3"]
    assert privacy["epsilon"] == max(privacy["per_node"].values()) > 0
    assert [r["epsilon"] for r in rows(run)][-1] == pytest.approx(privacy["epsilon"])


@pytest.mark.slow
def test_a_budget_the_first_task_would_pass_ends_the_command_with_the_setting_named(tmp_path):
    """The server finds it (it needs the partition sizes); flmnist says so as a bad setting: exit 2."""
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "strategy=fedbuff", "client.local_steps=5",
                   "privacy=dpsgd", "privacy.max_epsilon=0.5", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "flmnist: error: privacy.max_epsilon=0.5 is less than one training task spends on partition"), proc.stderr


# ------------------------------------------------------------------ privacy=client and privacy=local

class ModNode(FakeNode):
    """A scripted node whose train replies pass through the ClientApp's ``update_dp_mod``, as in
    flmnist's ClientApp (a plain FakeNode is a node that does not clip)."""

    def answer_train(self, msg: Message, behaviour: str) -> Message | None:
        return update_dp_mod(msg, None, lambda m, _context: FakeNode.answer_train(self, m, behaviour))


def train_message(weights: dict, **sent) -> Message:
    config = dataclasses.replace(SENT, **sent).to_record()
    return Message(RecordDict({p.ARRAYS: record(weights), p.CONFIG: config}), dst_node_id=11,
                   message_type=MessageType.TRAIN)


def client_fedavg(sigma: float, clip: float, nodes: int = 4):
    strategy, accountant, path, _ = guarded("client", wrap_sync, sigma, clip, nodes)
    path.lengths.update_clip = clip  # what run_setup passes under privacy=client
    return strategy, accountant, path


@pytest.mark.parametrize("delta", [False, True])
def test_under_privacy_client_the_node_clips_its_update_before_it_leaves(task_identity, delta):
    """An update of length 200 (every coordinate +1; FedBuff: the delta itself) arrives at the
    server with length clipping_norm: Flower's fixedclipping_mod (a model), flmnist's FlatClip (a delta)."""
    reply = ModNode(0, 1.0).answer(train_message(BIG, update_clip=0.5, reply_delta=delta))
    update = to_weights(reply.content[p.ARRAYS])["w"] - (0 if delta else BIG["w"])
    assert np.linalg.norm(update.astype(np.float64)) == pytest.approx(0.5, rel=1e-5)
    assert update.min() == pytest.approx(update.max())  # scaled, not cut: the direction is kept
    small = ModNode(0, 1e-5).answer(train_message(BIG, update_clip=0.5, reply_delta=delta))  # length 2e-3
    assert to_weights(small.content[p.ARRAYS])["w"].mean() == pytest.approx(1e-5, rel=1e-3)  # untouched


def test_privacy_client_noises_the_average_of_clipped_updates_and_counts_like_central(task_identity):
    """Flower's client-side wrapper sends clipping_norm, the nodes clip (updates of length 200 to
    1), the server adds noise of std sigma * C / n and composes one release per round."""
    strategy, accountant, path = client_fedavg(sigma=2.0, clip=1.0)
    assert strategy.name == "FedAvg with client-side clipping"
    nodes = {i + 11: ModNode(i, 1.0) for i in range(4)}
    for server_round in (1, 2):
        arrays, _ = sync_round(strategy, nodes, BIG, server_round=server_round)
        moved = arrays["w"].numpy()
        assert moved.mean() == pytest.approx(1.0 / np.sqrt(BIG["w"].size), abs=0.01)
        assert moved.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.03)
    assert sum(path.rejected.values()) == 0
    assert accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 2), rel=1e-6)
    assert accountant.summary()["mechanism"] == "client"


def test_under_privacy_client_an_unclipped_update_is_rejected_naming_the_clip(task_identity):
    """Three nodes clip; one does not (a plain FakeNode, length 200): the screen rejects it with the
    clip in the reason and the round averages three clipped updates and one zero update."""
    strategy, accountant, path = client_fedavg(sigma=1e-3, clip=1.0)
    nodes = {11: ModNode(0, 1.0), 12: ModNode(1, 1.0), 13: ModNode(2, 1.0), 14: FakeNode(3, 1.0)}
    arrays, _ = sync_round(strategy, nodes, BIG)
    assert path.rejected == {"node 3": 1}
    assert any("exceeds privacy.clipping_norm=N" in reason for reason in path.reasons)  # (its kind: figures as N)
    clipped = 1.0 / np.sqrt(BIG["w"].size)
    assert arrays["w"].numpy().mean() == pytest.approx(0.75 * clipped, rel=0.01)
    assert accountant.rdp.num_releases == 1


def test_local_dp_clips_and_adds_noise_of_std_sigma_clip_on_the_node(task_identity):
    """The reply of a node asked for local DP: its update (length 200) clipped to C = 0.5, plus
    Gaussian noise of std sigma * C = 1.0 on every coordinate; a fresh draw on every reply."""
    msg = train_message(BIG, update_clip=0.5, update_noise=2.0)
    first, second = (to_weights(ModNode(0, 1.0).answer(msg).content[p.ARRAYS])["w"] for _ in range(2))
    assert first.std() == pytest.approx(2.0 * 0.5, rel=0.03)
    # clipped: every coordinate +0.0025 (unclipped: +1); the noise's mean has std 1 / 200 = 0.005,
    # so 0.025 is five of those (0.01, two, failed one run in twenty)
    assert first.mean() == pytest.approx(0.5 / np.sqrt(BIG["w"].size), abs=0.025)
    assert not np.allclose(first, second)  # no seed the server could know
    delta = to_weights(ModNode(0, 1.0).answer(train_message(BIG, update_clip=0.5, update_noise=2.0,
                                                            reply_delta=True)).content[p.ARRAYS])["w"]
    assert delta.std() == pytest.approx(1.0, rel=0.03)  # FedBuff's delta: the same release


def test_each_nodes_local_epsilon_is_dp_accountings_figure_for_the_tasks_it_was_sent(task_identity):
    """Three rounds of two nodes out of four: each node's epsilon is dp-accounting's for the number
    of Gaussian releases (training tasks) it was sent; the run's is the largest."""
    from flmnist.engine.local_privacy import LocalAccountant

    settings = PrivacySettings("local", noise_multiplier=1.3, clipping_norm=1.0, target_delta=DELTA)
    accountant = LocalAccountant(settings, SENT, LIMITS.train_examples)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2, fraction_train=0.5),
                       make_path(), privacy=accountant)
    assert strategy.name == "FedAvg with local DP on the nodes"
    nodes = {i + 11: FakeNode(i, 0.01) for i in range(4)}
    for server_round in (1, 2, 3):
        sync_round(strategy, nodes, BIG, server_round=server_round)
    tasks = {f"node {part}": n for part, n in accountant.tasks.items()}
    assert sum(tasks.values()) == 6
    rdp = {}
    for name, n in tasks.items():
        one = RdpAccountant()
        one.compose(SelfComposedDpEvent(GaussianDpEvent(1.3), n))
        rdp[name] = one.get_epsilon(DELTA)
    assert {f"node {part}": accountant.epsilon_of(part) for part in accountant.tasks} == pytest.approx(rdp, rel=1e-12)
    summary = accountant.summary()  # rounded to 6 decimals
    assert summary["per_node"] == pytest.approx(rdp, rel=1e-6)
    assert summary["epsilon"] == pytest.approx(max(rdp.values()), rel=1e-6)
    assert summary["mechanism"] == "local" and summary["releases"] == 6


def test_a_local_budget_below_one_release_is_a_config_error():
    from flmnist.engine.local_privacy import LocalAccountant

    settings = PrivacySettings("local", noise_multiplier=1.0, clipping_norm=1.0, max_epsilon=1.0)
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=1 is less than one local DP release spends"):
        LocalAccountant(settings, SENT, LIMITS.train_examples).check_first_release()


def test_client_refuses_what_central_refuses_and_local_takes_any_strategy():
    from flwr.serverapp.strategy import FedMedian

    from flmnist.engine.privacy import problem

    assert "no epsilon can be accounted" in problem(PrivacySettings("client"), FedMedian())
    assert problem(PrivacySettings("local"), FedMedian()) is None  # the server only post-processes
    with pytest.raises(ConfigError, match="privacy.mechanism must be one of none, central, central_adaptive, client, local, dpsgd"):
        PrivacySettings("locall")


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["client", "local"])
def test_a_short_client_or_local_run_reports_epsilon(tmp_path, mechanism):
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=2", f"privacy={mechanism}",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert privacy["mechanism"] == mechanism
    assert privacy["epsilon"] == pytest.approx(rdp_epsilon(1.0, 2), rel=1e-4)  # 2 releases at sigma 1 (per node)
    assert [r["epsilon"] for r in rows(run)] == pytest.approx([rdp_epsilon(1.0, k) for k in (1, 2)], rel=1e-4)
    if mechanism == "local":
        assert privacy["per_node"] == pytest.approx({f"node {i}": rdp_epsilon(1.0, 2) for i in range(4)}, rel=1e-4)
    # privacy=local withholds the nodes' training losses (their data, un-noised); privacy=client sends them
    withheld = mechanism == "local"
    log = proc.stderr + proc.stdout
    assert ("nodes send no training losses and client evaluation is off (privacy.node_metrics=withheld)" in log) == withheld
    trained = [r for r in json.loads((run / "metrics.json").read_text()) if r["round"] > 0]
    assert [r.get("train_loss") is None for r in trained] == [withheld, withheld]
    assert (run / "client_loss.png").is_file() != withheld


@pytest.mark.slow
def test_a_node_that_does_not_clip_under_privacy_client_is_rejected_in_a_real_run(tmp_path):
    """client.fault=boost on node 0: its clipped update times 10 (the fault mod runs after the clip)."""
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=2", "privacy=client", "client.fault=boost",
                   "client.fault_nodes=[0]", f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exceeds privacy.clipping_norm=1 (privacy=client" in proc.stderr + proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["screen"]["rejected_per_node"] == {"node 0": 2}  # both rounds
    assert summary["privacy"]["releases"] == 2


# ------------------------------------------------------------------ privacy=central_adaptive

def adaptive_fedavg(sigma: float, clip: float, count_stddev: float, nodes: int = 4):
    from flmnist.engine.adaptive_privacy import wrap_adaptive

    strategy, accountant, _, wrapper = guarded("central_adaptive", wrap_adaptive, sigma, clip, nodes,
                                               count_stddev=count_stddev)
    return strategy, accountant, wrapper


@pytest.mark.parametrize("offset, factor", [(1.0, np.exp(0.1)), (1e-7, np.exp(-0.1))])
def test_the_adaptive_clip_grows_when_every_update_is_clipped_and_shrinks_when_none_is(task_identity, offset,
                                                                                      factor):
    """Target quantile 0.5, step 0.2, a count noise of 0.02 on 4 updates: all clipped (length 200
    against 0.1) -> the clip times e^0.1; none (length 2e-5) -> times e^-0.1 (Andrew et al.'s
    rule; Flower 1.41's own wrapper would move it the other way)."""
    strategy, _, wrapper = adaptive_fedavg(sigma=0.01, clip=0.1, count_stddev=0.02)
    sync_round(strategy, {i + 11: FakeNode(i, offset) for i in range(4)}, BIG)
    assert wrapper.clipping_norm == pytest.approx(0.1 * factor, rel=0.01)
    assert strategy.state_dict()["inner"]["clipping_norm"] == wrapper.clipping_norm  # in the checkpoint


def test_an_adaptive_round_noises_at_the_split_multiplier_and_counts_one_central_release(task_identity):
    """sigma 2 with count_stddev 4: the average gets noise multiplier (2^-2 - 4^-2)^-1/2 on the clip
    the updates were clipped to (not the adapted one) over n, and the round (sum and count) is
    accounted as one Gaussian release of sigma 2."""
    strategy, accountant, _ = adaptive_fedavg(sigma=2.0, clip=0.5, count_stddev=4.0)
    assert strategy.name == "FedAvg with central DP, adaptive clipping"
    arrays, _ = sync_round(strategy, {i + 11: FakeNode(i, 1e-7) for i in range(4)}, BIG)
    z = (2.0 ** -2 - 4.0 ** -2) ** -0.5
    assert arrays["w"].numpy().std() == pytest.approx(z * 0.5 / 4, rel=0.03)
    assert accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 1), rel=1e-6)
    assert accountant.summary()["update_noise_multiplier"] == pytest.approx(z, rel=1e-6)


def test_adaptive_clipping_refuses_a_count_noise_below_sigma_and_asynchronous_strategies():
    from flmnist.engine.privacy import problem

    with pytest.raises(ConfigError, match=r"privacy.count_stddev=1.0 must be more than privacy.noise_multiplier=1"):
        PrivacySettings("central_adaptive", noise_multiplier=1.0, count_stddev=1.0)
    settings = PrivacySettings("central_adaptive", count_stddev=4.0)
    assert "is for synchronous strategies (FedBuff is asynchronous)" in problem(settings, FedBuff())
    from flwr.serverapp.strategy import Krum

    assert "no epsilon can be accounted" in problem(settings, Krum())


@pytest.mark.slow
def test_an_adaptive_run_reports_its_clip_and_epsilon_each_round(tmp_path):
    run = tmp_path / "run"
    proc = flmnist(tmp_path, "model=logreg", "num_nodes=4", "num_rounds=2", "privacy=central_adaptive",
                   f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    assert privacy["mechanism"] == "central_adaptive"
    assert privacy["epsilon"] == pytest.approx(rdp_epsilon(1.0, 2), rel=1e-4)
    clips = [r["clipping_norm"] for r in rows(run)]
    assert clips[0] == 0.1 and len(clips) == 2 and clips[1] > 0


def test_central_dp_takes_exactly_its_nodes_when_a_spare_board_is_connected(task_identity):
    """num_nodes=2, three SuperNodes connected (a spare board, or one re-registered under a new
    node id): the round samples two of them, as the accountant assumes; it used to sample three
    and Flower's wrapper ended the run (ValueError: 3 != 2)."""
    strategy, accountant, _ = private_fedavg(sigma=1e-3, clip=1.0, nodes=2)
    nodes = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.01), 13: FakeNode(2, 0.01)}
    grid = FakeGrid(nodes)
    msgs = list(strategy.configure_train(1, record(BIG), SENT.to_record(), grid))
    assert len(msgs) == 2
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(msgs))
    assert arrays is not None and accountant.rdp.num_releases == 1
    grid.connected.discard(13)  # back to two: still two a round
    assert len(list(strategy.configure_train(2, arrays, SENT.to_record(), grid))) == 2


def test_a_dpsgd_task_of_a_node_not_yet_heard_from_counts_against_every_node_until_it_replies(task_identity):
    """Node id 12 is sent a task in each of three rounds and never answers in time: its partition is
    unknown, so those tasks count against every partition (the run's epsilon is that of the busiest
    partition plus three tasks). When it replies in round 4, the four tasks become its own."""
    from flmnist.engine.privacy import SampleAccountant

    settings = PrivacySettings("dpsgd", noise_multiplier=1.0, target_delta=DELTA)
    accountant = SampleAccountant(settings, SENT, LIMITS.train_examples)
    strategy = Guarded(FedAvg(min_available_nodes=2, min_train_nodes=2), make_path(guard_max_harm=None),
                       privacy=accountant)
    weights = BIG
    for server_round in (1, 2, 3):
        arrays, _ = sync_round(strategy, {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02, behave="silent")},
                               weights, server_round)
        weights = to_weights(arrays)
    assert accountant.unattributed == 3 and dict(accountant.tasks) == {0: 3}
    worst = max(accountant.epsilon_of(part, accountant.tasks[part] + 3) for part in range(len(LIMITS.train_examples)))
    assert accountant.epsilon == pytest.approx(worst) and accountant.epsilon > accountant.epsilon_of(0)
    assert accountant.summary()["unattributed_tasks"] == 3
    sync_round(strategy, {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.02)}, weights, 4)
    assert accountant.unattributed == 0 and dict(accountant.tasks) == {0: 4, 1: 4}
    assert accountant.epsilon == pytest.approx(max(accountant.epsilon_of(0), accountant.epsilon_of(1)))


def test_the_budget_does_not_stop_a_run_after_its_last_round(task_identity):
    """max_epsilon between two and three releases, num_rounds=2: the run ran every round, so it
    is not reported stopped early by the budget (it was: stopped_early after round 2 of 2)."""
    budget = (rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2
    strategy, _, path = private_fedavg(sigma=1.0, clip=1.0, max_epsilon=budget)
    strategy.last_round = 2
    nodes = {i + 11: FakeNode(i, 0.01) for i in range(4)}
    sync_round(strategy, nodes, BIG, server_round=1)
    sync_round(strategy, nodes, BIG, server_round=2)
    assert path.stopped is None


def test_an_adaptive_round_with_no_usable_update_releases_noise_and_counts(task_identity):
    """As central: every reply rejected, the model moves by the split noise alone and the round is
    one release."""
    strategy, accountant, _ = adaptive_fedavg(sigma=2.0, clip=0.5, count_stddev=4.0)
    arrays, _ = sync_round(strategy, {i + 11: FakeNode(i, 0.01, behave="nan") for i in range(4)}, BIG)
    z = (2.0 ** -2 - 4.0 ** -2) ** -0.5
    assert arrays["w"].numpy().std() == pytest.approx(z * 0.5 / 4, rel=0.03)
    assert accountant.epsilon == pytest.approx(rdp_epsilon(2.0, 1), rel=1e-6)
    assert strategy.failed_rounds == 1


# ------------------------------------------------------------------ per-node budgets, synchronous

def local_fedavg(tmp_path=None, max_epsilon=None):
    """privacy=local, four nodes, all sampled every round."""
    from flmnist.engine.local_privacy import LocalAccountant
    from flmnist.observers.recorder import RunRecorder

    settings = PrivacySettings("local", noise_multiplier=1.3, clipping_norm=1.0, target_delta=DELTA,
                               max_epsilon=max_epsilon)
    accountant = LocalAccountant(settings, SENT, LIMITS.train_examples)
    path = make_path()
    if tmp_path is not None:
        path.recorder = RunRecorder(tmp_path, 3, 0.9, printer=lambda s: None)
    return Guarded(FedAvg(min_available_nodes=4, min_train_nodes=4), path, privacy=accountant), accountant, path


SILENT_FOURTH = {11: FakeNode(0, 0.01), 12: FakeNode(1, 0.01), 13: FakeNode(2, 0.01), 14: FakeNode(3, 0.01, behave="silent")}


def test_a_local_dp_round_that_could_pass_the_budget_through_unreplied_tasks_is_not_sent(task_identity):
    """Node 3 never replies, so each of its tasks counts against every node: round 2 would charge
    node 0 its own task and node 3's, 4 releases in all. A budget between 3 and 4 releases' epsilon
    must stop after round 1; the check allowed one more task per node and the run ended above the
    budget (a review)."""
    budget = (rdp_epsilon(1.3, 3) + rdp_epsilon(1.3, 4)) / 2
    strategy, accountant, path = local_fedavg(max_epsilon=budget)
    sync_round(strategy, SILENT_FOURTH, BIG, server_round=1)
    assert accountant.unattributed == 1 and accountant.epsilon == pytest.approx(rdp_epsilon(1.3, 2), rel=1e-9)
    assert path.stopped == (1, "privacy budget")


def test_a_resumed_local_dp_run_still_counts_the_unreplied_tasks(task_identity):
    """The checkpoint's state restores the tasks of node ids that never replied; the resumed
    accountant dropped them and counted one task fewer against every node (a review)."""
    first, accountant, _ = local_fedavg()
    sync_round(first, SILENT_FOURTH, BIG, server_round=1)
    resumed, again, _ = local_fedavg()
    resumed.load_state_dict(first.state_dict())
    assert again.unattributed == accountant.unattributed == 1
    assert again.epsilon == pytest.approx(accountant.epsilon, rel=1e-12)


def test_local_dp_tasks_are_in_the_ledger_when_they_are_sent(task_identity, tmp_path):
    """The ledger counts a round's tasks before any reply: a server that dies mid-round has
    counted what the nodes were asked to release (it was written only after aggregation)."""
    strategy, _, _ = local_fedavg(tmp_path)
    grid = FakeGrid(SILENT_FOURTH)
    list(strategy.configure_train(1, record(BIG), SENT.to_record(), grid))
    ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
    assert ledger["state"]["unattributed"] == 4 and ledger["epsilon"] == pytest.approx(rdp_epsilon(1.3, 4), rel=1e-9)


@pytest.mark.parametrize("overrides, message", [
    (["strategy=fedasync", "strategy.rho=0.01"], "privacy=dpsgd with a proximal term (strategy.rho=0.01, FedAsync)"),
    (["strategy=fedprox"], "privacy=dpsgd with a proximal term (strategy.proximal_mu=0.01, FedProx)"),
])
def test_dpsgd_with_a_proximal_term_names_the_setting(overrides, message):
    """It said "with FedProx" for FedAsync's rho (a review)."""
    from flmnist.config.compose import compose_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(["privacy=dpsgd", *overrides])


def test_a_momentum_refusal_names_the_mechanism_that_runs():
    assert "under privacy=client" in strategy_problem(FedBuff(server_momentum=0.9), "client")


@pytest.mark.parametrize("mechanism", ["central", "local"])
@pytest.mark.parametrize("delta, warned", [(0.2, True), (1e-5, False)])
def test_a_client_level_delta_not_below_one_over_the_nodes_is_warned(caplog, mechanism, delta, warned):
    """A delta of 0.2 with 20 nodes reports an epsilon that lets one node's data out outright with
    probability 0.2 (a review: accepted in silence)."""
    from flmnist.config.compose import compose_config
    from flmnist.protocol.screen import ScreenSettings
    from flmnist.runtime.run_setup import private
    from flmnist.strategies import build_strategy

    cfg = compose_config([f"privacy={mechanism}", "num_nodes=20", f"privacy.target_delta={delta}"])
    with caplog.at_level("WARNING", logger="flwr"):
        private(cfg, build_strategy(cfg.strategy), ScreenSettings(**cfg.screen))
    assert ("privacy.target_delta=0.2 is not below 1/num_nodes (0.05)" in caplog.text) is warned


def test_a_local_dp_round_sampling_half_the_nodes_is_not_stopped_early(task_identity):
    """Two of four nodes a round: after round 1 two nodes are bound with one task each. Round 2's
    two tasks can charge a bound node at most 2 more (3 releases), so a budget between 3 and 4
    releases goes on; the check charged it 3 more and stopped a round early (a review)."""
    from flmnist.engine.local_privacy import LocalAccountant

    budget = (rdp_epsilon(1.3, 3) + rdp_epsilon(1.3, 4)) / 2
    settings = PrivacySettings("local", noise_multiplier=1.3, clipping_norm=1.0, target_delta=DELTA, max_epsilon=budget)
    accountant = LocalAccountant(settings, SENT, LIMITS.train_examples)
    path = make_path()
    strategy = Guarded(FedAvg(min_available_nodes=4, min_train_nodes=2, fraction_train=0.5), path, privacy=accountant)
    nodes = {i + 11: FakeNode(i, 0.01) for i in range(4)}
    sync_round(strategy, nodes, BIG, server_round=1)
    assert path.stopped is None
    sync_round(strategy, nodes, BIG, server_round=2)
    assert sum(accountant.tasks.values()) == 4  # both rounds' tasks, counted
    most = max(accountant.tasks.values())
    assert accountant.epsilon == pytest.approx(rdp_epsilon(1.3, most), rel=1e-6) and accountant.epsilon <= budget


def test_a_resumed_local_dp_run_checks_its_budget_as_if_every_node_id_were_new(task_identity):
    """A resumed run's node ids are new to it (Flower gives new ones), so its first round's four
    tasks may all count against every node: one task each plus four is 5 releases. A budget between
    4 and 5 stops before that round; the check allowed one more task each (a review)."""
    first, _, _ = local_fedavg()
    sync_round(first, {i + 11: FakeNode(i, 0.01) for i in range(4)}, BIG, server_round=1)
    resumed, _, path = local_fedavg(max_epsilon=(rdp_epsilon(1.3, 4) + rdp_epsilon(1.3, 5)) / 2)
    resumed.load_state_dict(first.state_dict())
    resumed.check_budget(1)
    assert path.stopped == (1, "privacy budget")


def test_a_resume_keeps_the_tasks_sent_since_the_checkpoint_to_a_node_below_the_largest(task_identity, tmp_path):
    """privacy=local: at the checkpoint node 0 had 5 tasks and node 1 had 3; then only node 1 was
    sent two more. The run's epsilon, the largest node's, did not grow, so the resume threw the
    ledger away with node 1's two tasks, which had left the server (a review)."""
    from flmnist.engine.privacy_ledger import restore_ledger, save_ledger

    _, accountant, path = local_fedavg(tmp_path)
    accountant.tasks.update({0: 5, 1: 3})
    checkpoint = accountant.state_dict()
    accountant.tasks.update({1: 2})
    save_ledger(path.recorder, accountant, accountant.epsilon)
    _, resumed, _ = local_fedavg(tmp_path)
    resumed.load_state_dict(checkpoint)
    restore_ledger(path.recorder, resumed)
    assert dict(resumed.tasks) == {0: 5, 1: 5}


def test_a_deployed_local_dp_run_stops_before_a_partition_offline_at_the_last_round_could_pass(task_identity):
    """Three partitions, partition 2 at its budget's last task; its board was offline when the last
    round went out, so only partitions 0 and 1 were charged for the next round, and partition 2's
    board, back under its old or a new node id, was sent a task past the budget (a review)."""
    from flmnist.engine.identity import IdentityBook
    from flmnist.engine.local_privacy import LocalAccountant
    from flmnist.engine.sent_tasks import SentTasks

    budget = (rdp_epsilon(2.0, 5) + rdp_epsilon(2.0, 6)) / 2  # 5 releases fit, 6 do not
    settings = PrivacySettings("local", noise_multiplier=2.0, clipping_norm=1.0, target_delta=DELTA, max_epsilon=budget)
    accountant = LocalAccountant(settings, SENT, LIMITS.train_examples[:3])
    accountant.tasks.update({0: 4, 1: 4, 2: 5})
    book = IdentityBook()
    for node_id, partition in ((11, 0), (12, 1), (13, 2)):
        book.judge(node_id, p.simulated_node_name(partition), partition)
    tasks = SentTasks(accountant, book)
    tasks.per_round, tasks.connected = 2, [11, 12]  # node id 13 (partition 2) was not connected
    assert tasks.would_exceed()
    tasks.per_round, tasks.connected = 3, [11, 12, 13]  # everyone there: partition 2 gets one more, 6: over
    assert tasks.would_exceed()
    accountant.tasks[2] = 4
    tasks.connected = [11, 12, 13]
    assert not tasks.would_exceed()  # one more each: 5, within the budget
    tasks.per_round, tasks.connected = 2, [11, 12]
    assert tasks.would_exceed()  # partition 2 back under a new node id: a task against everyone, node 0's own too
    accountant.tasks.update({0: -1, 1: -1, 2: -1})
    assert not tasks.would_exceed()  # 3 each: even 2 more stay within 5


def test_an_asynchronous_update_the_budget_stops_has_an_outcome(task_identity):
    """privacy=central, FedAsync, a budget of two releases: the third update passes the screen
    and counts among the client updates, but it is not applied; its outcome was counted nowhere,
    so the outcomes no longer added up to the client updates (a review)."""
    from test_engines import START, make_loop

    from flmnist.strategies import FedAsync

    budget = (rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2
    dp = AsyncPrivacy(PrivacySettings("central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=DELTA,
                                      max_epsilon=budget), num_nodes=2)
    loop, _ = make_loop({101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02)}, FedAsync(alpha=0.5), max_server_updates=10)
    loop.privacy, loop.accountant = dp, dp.accountant
    loop.run(record(START))
    stats = loop.stats_dict()
    assert loop.version == 2 and loop.path.stopped[1] == "privacy budget"
    assert stats["outcomes"].get("not applied: privacy budget") == 1
    assert sum(stats["outcomes"].values()) == stats["client_updates"]


@pytest.mark.parametrize("kind", ["fedasync", "fedbuff"])
def test_an_asynchronous_run_resumed_at_its_budget_sends_no_task(task_identity, tmp_path, kind):
    """privacy=central, stopped at its budget after 2 releases and checkpointed there (then killed
    before it finished, say): resumed with the same budget, it sent every node a task, trained them
    and only then stopped, one update not applied (a review). Now it stops before sending any."""
    from test_engines import DELTA as REPLY_DELTA
    from test_engines import START, make_loop

    from flmnist.observers.checkpoint import load_checkpoint
    from flmnist.observers.recorder import RunRecorder
    from flmnist.strategies import FedAsync

    make = (lambda: FedAsync(alpha=0.5)) if kind == "fedasync" else (lambda: FedBuff(buffer_size=2))
    budget = (rdp_epsilon(1.0, 2) + rdp_epsilon(1.0, 3)) / 2
    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=1.0, target_delta=DELTA, max_epsilon=budget)
    runs = []
    for checkpoint in (None, "checkpoint"):
        loop, grid = make_loop({101: FakeNode(0, 0.01), 102: FakeNode(1, 0.02)}, make(), max_server_updates=10,
                               sent=SENT if kind == "fedasync" else REPLY_DELTA)
        loop.privacy = AsyncPrivacy(settings, num_nodes=2)
        loop.accountant = loop.privacy.accountant
        loop.path.recorder = RunRecorder(tmp_path, 10, 0.99, printer=lambda line: None)
        loop.path.checkpoint_every = 1
        loop.run(record(START), load_checkpoint(tmp_path / "checkpoint.pt") if checkpoint else None)
        runs.append((loop, grid))
    (first, _), (resumed, grid) = runs
    assert first.version == 2 and first.path.stopped[1] == "privacy budget"
    assert resumed.version == 2 and resumed.path.stopped == (2, "privacy budget")
    assert sum(grid.trained(n) for n in (101, 102)) == 0 and resumed.stats.client_updates == first.stats.client_updates
    assert resumed.accountant.epsilon == pytest.approx(first.accountant.epsilon) and first.accountant.epsilon <= budget
