from pathlib import Path

import pytest
from hydra.utils import get_class

from flmnist.config import compose_config, group_options
from flmnist.errors import ConfigError
from flmnist.strategies import STRATEGIES, get_strategy

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_experiment_preset_composes_and_validates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.name == experiment


def test_seed002_preset_matches_the_seed():
    cfg = compose_config(["experiment=seed002"])
    assert cfg.num_nodes == 3 and cfg.num_rounds == 40
    assert list(map(list, cfg.partition.groups)) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert cfg.model._target_ == "flmnist.models.LeNet"
    assert (cfg.client.local_steps, cfg.client.batch_size, cfg.client.lr) == (10, 32, 0.1)
    assert list(cfg.eval.update_rounds) == [1, 11, 21, 31, 40]


def test_mcmahan_presets():
    for name, part in (("mcmahan_iid", "IidPartition"), ("mcmahan_noniid", "ShardPartition")):
        cfg = compose_config([f"experiment={name}"])
        assert cfg.num_nodes == 100 and cfg.strategy.fraction_train == 0.1 == cfg.sampling.fraction_train
        assert (cfg.client.local_epochs, cfg.client.batch_size) == (5, 10)
        assert cfg.model._target_.endswith("CNNMcMahan") and cfg.partition._target_.endswith(part)
        assert cfg.target_accuracy == 0.99


@pytest.mark.parametrize("group", ["model", "partition", "strategy", "client", "eval", "fleet"])
def test_every_group_option_composes(group):
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if option == "digit_groups":
            overrides.append("num_nodes=3")
        compose_config(overrides)


def test_registry_and_strategy_configs_agree():
    assert set(STRATEGIES) == set(group_options("strategy"))
    for name, cls in STRATEGIES.items():
        assert get_class(compose_config([f"strategy={name}"]).strategy._target_) is cls


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="Unknown strategy 'fedfoo'.*fedadam, fedasync, fedavg, fedavgm, fedbuff, fedprox"):
        compose_config(["strategy=fedfoo"])
    with pytest.raises(ConfigError, match="Valid strategies: fedadam, fedasync, fedavg"):
        get_strategy("fedfoo")


def test_unknown_option_in_any_group_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="Unknown partition 'zipf'.*digit_groups, dirichlet, iid, shards"):
        compose_config(["partition=zipf"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["partition=dirichlet", "partition.alpha=0"], "partition.alpha must be > 0"),
        (["partition=dirichlet", "partition.alpha=-0.5"], "partition.alpha must be > 0"),
        (["sampling.fraction_train=0"], r"sampling.fraction_train must be in \(0, 1\]"),
        (["sampling.fraction_train=1.5"], r"sampling.fraction_train must be in \(0, 1\]"),
        (["sampling.fraction_evaluate=-0.1"], r"sampling.fraction_evaluate must be in \[0, 1\]"),
        (["strategy.fraction_train=2"], r"strategy.fraction_train must be in \(0, 1\]"),
        (["num_nodes=60001"], "more partitions than the 60000 training examples"),
        (["partition=digit_groups", "num_nodes=2", "partition.groups=[[0,1],[1,2]]"], "digit 1 is in more than one group"),
        (["partition=digit_groups", "num_nodes=2", "partition.groups=[[0,1],[2,12]]"], "digit 12 is outside 0-9"),
        (["partition=digit_groups", "num_nodes=2"], "partition.groups lists 3 groups but num_nodes=2"),
        (["num_rounds=0"], "num_rounds must be a positive number"),
        (["num_rounds=-3"], "num_rounds must be a positive number"),
        (["client.batch_size=0"], "client.batch_size must be a positive number"),
        (["client.local_steps=0"], "client.local_steps must be a positive number"),
        (["data.holdout_fraction=1.0"], r"data.holdout_fraction must be in \[0, 1\)"),
        (["data.holdout_fraction=0"], "data.holdout_fraction is 0"),
        (["eval.update_rounds=[5]"], "eval.update_rounds lists round 5, outside 1..num_rounds=3"),
        (["strategy.server_learning_rate=0"], "strategy.server_learning_rate must be > 0"),
    ],
)
def test_invalid_settings_fail_before_training_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg = compose_config(overrides)
        # strategy parameters are checked when the strategy is built, still before any training
        from flmnist.config import build

        build(cfg.strategy, "strategy")


def test_sweep_comparison_table(tmp_path):
    from flmnist.cli import write_comparison

    summaries = [
        {"overrides": "strategy=fedavg", "status": "finished", "final_accuracy": 0.9612, "best_accuracy": 0.9630,
         "rounds_to_target": 31, "wall_time": 73.04, "run_dir": "a"},
        {"overrides": "strategy=fedprox", "status": "failed", "final_accuracy": None, "best_accuracy": None,
         "rounds_to_target": None, "wall_time": None, "run_dir": "b"},
    ]
    md = write_comparison(tmp_path, summaries)
    assert "| 0 | strategy=fedavg | finished | 96.12% | 96.30% | 31 | 73.0 |" in md
    assert "| 1 | strategy=fedprox | failed | - | - | not reached | - |" in md
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("job,overrides,status,final_accuracy") and len(rows) == 3


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_every_preset_composes_with_every_strategy(experiment):
    """A preset's strategy settings must not break a strategy swap (experiment=X strategy=Y)."""
    from flmnist.config import build

    for strategy in STRATEGIES:
        cfg = compose_config([f"experiment={experiment}", f"strategy={strategy}"])
        assert isinstance(build(cfg.strategy, "strategy"), STRATEGIES[strategy])
