"""flmnist's strategies: ``strategy=NAME`` picks ``conf/strategy/NAME.yaml``.

Synchronous strategies are Flower's own classes (``flwr.serverapp.strategy``), named directly
in the YAML and wrapped at run time by :class:`~flmnist.engine.guard.Guarded`, which adds
the reply screen, hooks, recording, the virtual clock and checkpoint state. The asynchronous
ones (FedAsync, FedBuff) are :class:`~flmnist.strategies.asynchronous.AsyncStrategy` rules run
by :mod:`flmnist.engine.async_loop`.
"""

from __future__ import annotations

import math

from flmnist.core.build import build
from flmnist.core.checks import check_integer, check_number
from flmnist.strategies.fedasync import FedAsync
from flmnist.strategies.fedavg import FedAvg
from flmnist.strategies.fedbuff import FedBuff
from flmnist.strategies.fedsgd import FedSGD

# Parameters of Flower's strategies that their constructors do not check: key -> the
# check_number interval (low, high, low_open, high_open), or the lowest integer allowed.
_NUMBERS = {
    "fraction_train": (0.0, 1.0, True, False),
    "fraction_evaluate": (0.0, 1.0, False, False),
    "proximal_mu": (0.0, math.inf, False, False),
    "eta": (0.0, math.inf, True, False),
    "eta_l": (0.0, math.inf, True, False),
    "tau": (0.0, math.inf, True, False),
    "beta_1": (0.0, 1.0, False, True),
    "beta_2": (0.0, 1.0, False, True),
    "server_learning_rate": (0.0, math.inf, True, False),
    "server_momentum": (0.0, 1.0, False, True),
    "beta": (0.0, 0.5, False, True),
}
_INTEGERS = {
    "min_train_nodes": 1,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 1,
    "num_malicious_nodes": 0,
    "num_nodes_to_select": 1,
}


def check_parameters(strategy) -> None:
    """Check a Flower strategy's parameters, naming the setting at fault."""
    for key, (low, high, low_open, high_open) in _NUMBERS.items():
        if hasattr(strategy, key):
            check_number(f"strategy.{key}", getattr(strategy, key), low, high, low_open=low_open, high_open=high_open)
    for key, low in _INTEGERS.items():
        if hasattr(strategy, key):
            check_integer(f"strategy.{key}", getattr(strategy, key), low)


def build_strategy(node):
    """Instantiate ``conf/strategy/NAME.yaml`` (the ``strategy`` config node) and check it."""
    strategy = build(node, "strategy")
    check_parameters(strategy)
    return strategy


__all__ = ["FedAsync", "FedAvg", "FedBuff", "FedSGD", "build_strategy", "check_parameters"]
