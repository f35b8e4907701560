"""flmnist's strategies: ``strategy=NAME`` picks ``conf/strategy/NAME.yaml``.

Synchronous strategies are Flower's own classes (``flwr.serverapp.strategy``), named directly
in the YAML and wrapped at run time by :class:`~flmnist.strategies.guard.Guarded`, which adds
the reply screen, hooks, recording, the virtual clock and checkpoint state. The asynchronous
ones (FedAsync, FedBuff) are :class:`~flmnist.strategies.asynchronous.AsyncStrategy` rules run
by :mod:`flmnist.async_loop`.
"""

from __future__ import annotations

import math

from flmnist.errors import ConfigError
from flmnist.strategies.fedasync import FedAsync
from flmnist.strategies.fedavg import FedAvg
from flmnist.strategies.fedbuff import FedBuff

# Parameters of Flower's strategies that their constructors do not check: (low, high, closed).
# A value must be finite and within [low, high] (closed) or (low, high] / [low, high) as marked.
_RULES = {
    "fraction_train": ("(0, 1]", lambda v: 0 < v <= 1),
    "fraction_evaluate": ("[0, 1]", lambda v: 0 <= v <= 1),
    "proximal_mu": (">= 0", lambda v: v >= 0),
    "eta": ("> 0", lambda v: v > 0),
    "eta_l": ("> 0", lambda v: v > 0),
    "tau": ("> 0", lambda v: v > 0),
    "beta_1": ("[0, 1)", lambda v: 0 <= v < 1),
    "beta_2": ("[0, 1)", lambda v: 0 <= v < 1),
    "server_learning_rate": ("> 0", lambda v: v > 0),
    "server_momentum": ("[0, 1)", lambda v: 0 <= v < 1),
    "beta": ("[0, 0.5)", lambda v: 0 <= v < 0.5),
}
_INT_RULES = {
    "min_train_nodes": 1,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 1,
    "num_malicious_nodes": 0,
    "num_nodes_to_select": 1,
}


def check_parameters(strategy) -> None:
    """Check a Flower strategy's parameters, naming the setting at fault."""
    for key, (allowed, ok) in _RULES.items():
        if not hasattr(strategy, key):
            continue
        value = getattr(strategy, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)):
            raise ConfigError(f"strategy.{key} must be a finite number in {allowed}, got {value!r}")
    for key, low in _INT_RULES.items():
        if not hasattr(strategy, key):
            continue
        value = getattr(strategy, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"strategy.{key} must be an integer >= {low}, got {value!r}")


def build_strategy(node):
    """Instantiate ``conf/strategy/NAME.yaml`` (the ``strategy`` config node) and check it."""
    from flmnist.config import build

    strategy = build(node, "strategy")
    check_parameters(strategy)
    return strategy


__all__ = ["FedAsync", "FedAvg", "FedBuff", "build_strategy", "check_parameters"]
