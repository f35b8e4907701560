"""flmnist's strategies: ``strategy=NAME`` picks ``conf/strategy/NAME.yaml``.

Synchronous strategies are Flower's own classes (``flwr.serverapp.strategy``), named directly
in the YAML and wrapped at run time by :class:`~flmnist.engine.guard.Guarded`, which adds
the reply screen, hooks, recording, the virtual clock and checkpoint state. The asynchronous
ones (FedAsync, FedBuff) are :class:`~flmnist.strategies.asynchronous.AsyncStrategy` rules run
by :mod:`flmnist.engine.async_loop`.

A strategy class declares what flmnist needs to know about it beside its code: the ranges of
its parameters (``parameter_ranges``, merged over Flower's in :mod:`flmnist.strategies.ranges`)
and the attributes to checkpoint (``checkpoint_state``, :mod:`flmnist.strategies.state`). A new
strategy is its class plus ``conf/strategy/NAME.yaml``.
"""

from __future__ import annotations

from flmnist.core.build import build
from flmnist.strategies.fedasync import FedAsync
from flmnist.strategies.fedavg import FedAvg
from flmnist.strategies.fedbuff import FedBuff
from flmnist.strategies.fedsgd import FedSGD
from flmnist.strategies.ranges import FLOWER_RANGES, Range, check_parameters, check_settings
from flmnist.strategies.state import checkpoint_state


def build_strategy(node):
    """Instantiate ``conf/strategy/NAME.yaml`` (the ``strategy`` config node) and check it."""
    check_settings(node)
    strategy = build(node, "strategy")
    check_parameters(strategy)
    return strategy


__all__ = ["FLOWER_RANGES", "FedAsync", "FedAvg", "FedBuff", "FedSGD", "Range", "build_strategy",
           "check_parameters", "checkpoint_state"]
