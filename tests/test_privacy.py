"""``privacy=central``: the noise is where and as large as the guarantee says, epsilon is the RDP
accountant's own figure for the releases made, the budget stops the run before the release that
would pass it, a resume continues the count, and a strategy the accountant cannot cover is
refused naming the setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from test_engines import FakeNode, make_path, sync_round

from flmnist.core.errors import ConfigError
from flmnist.engine.guard import Guarded
from flmnist.engine.privacy import AsyncPrivacy, strategy_problem, wrap_sync
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


def private_fedavg(sigma: float, clip: float, nodes: int = 4, max_epsilon: float | None = None):
    settings = PrivacySettings("central", noise_multiplier=sigma, clipping_norm=clip, target_delta=DELTA,
                               max_epsilon=max_epsilon)
    inner = FedAvg(min_available_nodes=nodes, min_train_nodes=nodes, fraction_evaluate=0.0)
    wrapper, accountant, per_round = wrap_sync(inner, settings, nodes)
    path = make_path(max_norm_ratio=None, clip_to_median=None)
    return Guarded(wrapper, path, privacy=accountant, per_round=per_round), accountant, path


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
    (FedBuff(server_momentum=0.9), "use server_momentum=0.0 under privacy=central"),
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
    dp = AsyncPrivacy(settings, num_nodes=8, seed=0)
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
    dp = AsyncPrivacy(settings, num_nodes=8, seed=0)
    strategy = FedBuff(buffer_size=4, server_learning_rate=1.0, server_momentum=0.0)
    zero = {"w": np.zeros(10, np.float32)}
    for name in ("node 0", "node 0", "node 1", "node 2"):
        dp.prepare(strategy, name, zero, zero)
    dp.released(strategy, zero, zero)
    assert dp.accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 1), rel=1e-6)  # sensitivity 2C: sigma / 2
    assert dp.accountant.summary()["repeated_releases"] == {"2": 1}  # the summary says so
    restored = AsyncPrivacy(settings, num_nodes=8, seed=0)
    restored.load_state_dict(dp.state_dict())  # and a resumed run still knows
    assert restored.accountant.summary()["repeated_releases"] == {"2": 1}


def test_fedasync_clips_the_move_and_noises_each_update():
    settings = PrivacySettings("central", noise_multiplier=1.0, clipping_norm=0.5, target_delta=DELTA)
    dp = AsyncPrivacy(settings, num_nodes=4, seed=0)
    current = {"w": np.zeros(40_000, np.float32)}
    arrived = {"w": np.full(40_000, 3.0, np.float32)}  # length 600, clipped to 0.5
    sent = dp.prepare(type("FedAsyncLike", (), {"reply_delta": False})(), "node 0", arrived, current)["w"]
    assert sent.mean() == pytest.approx(0.5 / np.sqrt(40_000), abs=0.01)
    assert sent.std() == pytest.approx(0.5, rel=0.03)
    assert dp.accountant.epsilon == pytest.approx(rdp_epsilon(1.0, 1), rel=1e-6)


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
    the summary says why, and each round's epsilon is the accountant's for that many releases."""
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
                noise_multiplier=3.0, clipping_norm=2.0, generator=torch.Generator().manual_seed(0),
                dev=torch.device("cpu"))
    moved = {k: (model.state_dict()[k] - before[k]).flatten() for k in before}
    weight = next(k for k in moved if k.endswith("weight"))
    assert moved[weight].std().item() == pytest.approx(3.0 * 2.0 / 64, rel=0.05)
    assert not model._forward_hooks and not hasattr(model, "_module")  # Opacus's hooks are gone


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
