"""flmnist's strategies and their registry: ``strategy=NAME`` picks ``conf/strategy/NAME.yaml``.

Synchronous strategies reuse Flower's round loop. The asynchronous ones
(FedAsync, FedBuff; a later issue) will register here too and bring their own
loop on ``Grid.push_messages``/``pull_messages``.
"""

from __future__ import annotations

from flmnist.errors import ConfigError
from flmnist.strategies.fedavg import FedAvg
from flmnist.strategies.flower import FedAdam, FedAvgM, FedProx

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
}


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown strategy '{name}'. Valid strategies: {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "FedAdam", "FedAvg", "FedAvgM", "FedProx", "get_strategy"]
