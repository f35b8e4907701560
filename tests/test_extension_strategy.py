"""Adding a strategy is one file plus one YAML: a toy strategy of one's own (tests/toy_strategy.py)
joins through a copy of conf/ alone, with no flmnist source file edited. The class declares the
range of its parameter and the state to checkpoint; the YAML pulls the shared sampling settings
in through its defaults list."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import toy_strategy
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import flmnist
from flmnist.config.compose import compose_config, group_options
from flmnist.core.errors import ConfigError
from flmnist.strategies import build_strategy
from flmnist.strategies.ranges import Range
from flmnist.strategies.state import checkpoint_state

REPO = Path(__file__).resolve().parents[1]
SAMPLING = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
            "min_available_nodes")
TOY_YAML = """\
# ToyStrategy: Flower's FedAvg with a damped server step (tests/toy_strategy.py).
defaults: [_sampling, _self_]  # fraction_train ... min_available_nodes from sampling.*
_target_: toy_strategy.ToyStrategy
mix: 0.5               # share of the way from the model sent to the nodes' average, in (0, 1]
"""


@pytest.fixture
def toy_conf(tmp_path, monkeypatch) -> Path:
    """A copy of conf/ with conf/strategy/toy.yaml added, as FLMNIST_CONF_DIR."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    (conf / "strategy" / "toy.yaml").write_text(TOY_YAML)
    monkeypatch.setenv("FLMNIST_CONF_DIR", str(conf))
    return conf


def test_the_toy_is_not_part_of_flmnist():
    package = Path(flmnist.__file__).resolve().parent
    assert not Path(toy_strategy.__file__).resolve().is_relative_to(package)
    assert "toy" not in group_options("strategy")  # the repository's conf/ is untouched


def test_toy_strategy_composes_with_the_shared_sampling(toy_conf):
    assert "toy" in group_options("strategy") and "_sampling" not in group_options("strategy")
    cfg = compose_config(["strategy=toy", "num_nodes=4", "sampling.fraction_train=0.5",
                          "sampling.min_train_nodes=2"])
    assert cfg.strategy._target_ == "toy_strategy.ToyStrategy" and cfg.strategy.mix == 0.5
    assert {k: cfg.strategy[k] for k in SAMPLING} == {k: cfg.sampling[k] for k in SAMPLING}
    s = cfg.strategy
    assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (0.5, 2, 4)
    assert set(cfg.strategy) == {"_target_", "mix", *SAMPLING}


def test_toy_parameter_is_checked_by_its_declared_range(toy_conf):
    # (0, 1]: 1 is allowed, 0 is not
    assert compose_config(["strategy=toy", "strategy.mix=1.0"]).strategy.mix == 1.0
    for value in ("0", "1.5", "-0.1", "nan"):
        with pytest.raises(ConfigError) as err:
            compose_config(["strategy=toy", f"strategy.mix={value}"])
        message = str(err.value)
        assert message.startswith("strategy.mix must be a finite number in (0, 1], got "), message


def test_toy_strategy_keeps_flowers_checks_of_the_sampling(toy_conf):
    written = r"^sampling\.fraction_train \(strategy\.fraction_train\) must be a finite number"
    with pytest.raises(ConfigError, match=written + r" in \(0, 1\], got 0$"):
        compose_config(["strategy=toy", "sampling.fraction_train=0"])
    with pytest.raises(ConfigError, match=r"^strategy\.min_train_nodes must be an integer >= 1"):
        compose_config(["strategy=toy", "strategy.min_train_nodes=0"])


def test_toy_state_is_checkpointed(toy_conf):
    built = build_strategy(compose_config(["strategy=toy"]).strategy)
    assert isinstance(built, toy_strategy.ToyStrategy)
    assert checkpoint_state(built) == ("updates_seen",)


class NodeList:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return self.ids


def test_toy_strategy_aggregates_a_round(toy_conf, task_identity):
    """The toy is a working strategy: a round moves the model half way to the average."""
    built = build_strategy(compose_config(["strategy=toy"]).strategy)
    sent = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    msgs = list(built.configure_train(1, sent, ConfigRecord(), NodeList([11, 12])))
    replies = []
    for msg, value, n in zip(msgs, (2.0, 8.0), (3, 1), strict=True):
        model = ArrayRecord({"w": Array(np.full(3, value, np.float32))})
        content = RecordDict({"arrays": model, "metrics": MetricRecord({"num-examples": n})})
        replies.append(Message(content=content, reply_to=msg))
    arrays, _ = built.aggregate_train(1, replies)
    # the average (3 * 2 + 1 * 8) / 4 = 3.5, and half of the way there from 0
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.75, np.float32))
    assert built.updates_seen == 2


@pytest.mark.parametrize("option, expected", [
    ("fedavg", ("current_arrays", "momentum_vector")),   # flmnist's FedAvg declares FedAvgM's
    ("fedavgm", ("current_arrays", "momentum_vector")),
    ("fedadam", ("current_arrays", "m_t", "v_t")),
    ("fedadagrad", ("current_arrays", "m_t", "v_t")),
    ("fedyogi", ("current_arrays", "m_t", "v_t")),
    ("sgd_adam", ("current_arrays", "m_t", "v_t", "adam_steps")),  # FedSGD declares its own
    ("unweighted_fedavg", ("current_arrays", "momentum_vector")),
    ("fedprox", ()), ("fedmedian", ()), ("fedtrimmedavg", ()), ("krum", ()), ("multikrum", ()),
    ("bulyan", ()),
])
def test_checkpoint_state_of_every_synchronous_option(option, expected):
    built = build_strategy(compose_config([f"strategy={option}", "num_nodes=7"]).strategy)
    assert checkpoint_state(built) == expected


def test_an_integer_range_with_an_upper_end():
    Range(1, 5, integer=True).check("strategy.k", 5)
    with pytest.raises(ConfigError, match=r"^strategy\.k must be an integer >= 1, got 2\.0$"):
        Range(1, 5, integer=True).check("strategy.k", 2.0)
    interval = r"^strategy\.k must be a finite number in \[1, 5\]"
    with pytest.raises(ConfigError, match=interval + r", got 6$"):
        Range(1, 5, integer=True).check("strategy.k", 6)
    with pytest.raises(ConfigError, match=r"^strategy\.k must be an integer >= 1, got 0$"):
        Range(0, integer=True, low_open=True).check("strategy.k", 0)
