"""flmnist's strategies and their registry: ``strategy=NAME`` picks ``conf/strategy/NAME.yaml``.

Synchronous strategies reuse Flower's round loop. The asynchronous ones (FedAsync,
FedBuff) are :class:`~flmnist.strategies.asynchronous.AsyncStrategy` rules run by
:mod:`flmnist.async_loop` on ``Grid.push_messages``/``pull_messages``.
"""

from __future__ import annotations

from flmnist.errors import ConfigError
from flmnist.strategies.fedasync import FedAsync
from flmnist.strategies.fedavg import FedAvg
from flmnist.strategies.fedbuff import FedBuff
from flmnist.strategies.flower import FedAdam, FedAvgM, FedProx

STRATEGIES: dict[str, type] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedasync": FedAsync,
    "fedbuff": FedBuff,
}


def get_strategy(name: str) -> type:
    """The strategy class registered as ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"Unknown strategy '{name}'. Valid strategies: {', '.join(sorted(STRATEGIES))}"
        ) from None


__all__ = ["STRATEGIES", "FedAdam", "FedAsync", "FedAvg", "FedAvgM", "FedBuff", "FedProx", "get_strategy"]
