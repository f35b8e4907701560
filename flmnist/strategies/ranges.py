"""The allowed ranges of strategy parameters, declared once: Flower's in :data:`FLOWER_RANGES`,
a strategy class of one's own in its ``parameter_ranges`` class attribute.

Flower's strategy constructors do not check their numbers (a ``fraction_train`` of 2 or a
negative ``eta`` only fails, if at all, rounds later). :func:`check_parameters` checks every
declared key a strategy instance has, so a bad value fails before the run starts with one
ConfigError naming ``strategy.KEY``. A class of one's own adds its parameters beside its code::

    class MyStrategy(FedAvg):
        parameter_ranges = {"my_param": Range(0.0, 1.0, low_open=True)}

merged over :data:`FLOWER_RANGES` (a key declared in both: the class's range wins).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from flmnist.core.checks import check_integer, check_number


@dataclass(frozen=True)
class Range:
    """The values a parameter may take: a finite real number in the interval from ``low`` to
    ``high`` (each end closed unless ``low_open``/``high_open``), or, when ``integer``, an integer
    in it (``Range(1, integer=True)``: an integer >= 1)."""

    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, key: str, value) -> None:
        """Nothing if ``value`` lies in the range, else a ConfigError naming ``key``."""
        if self.integer:
            lowest = math.floor(self.low) + 1 if self.low_open else math.ceil(self.low)
            check_integer(key, value, lowest)
            if self.high == math.inf:
                return
        check_number(key, value, self.low, self.high, low_open=self.low_open,
                     high_open=self.high_open)


# Parameters of Flower's strategies (flwr.serverapp.strategy, by Flower's names) that their
# constructors do not check. The key is looked up on any strategy: flmnist's FedAvg and FedSGD
# (FedAvgM and FedOpt underneath) and FedBuff's server step share these names.
FLOWER_RANGES: Mapping[str, Range] = {
    "fraction_train": Range(0.0, 1.0, low_open=True),
    "fraction_evaluate": Range(0.0, 1.0),
    "proximal_mu": Range(0.0),
    "eta": Range(0.0, low_open=True),
    "eta_l": Range(0.0, low_open=True),
    "tau": Range(0.0, low_open=True),
    "beta_1": Range(0.0, 1.0, high_open=True),
    "beta_2": Range(0.0, 1.0, high_open=True),
    "server_learning_rate": Range(0.0, low_open=True),
    "server_momentum": Range(0.0, 1.0, high_open=True),
    "beta": Range(0.0, 0.5, high_open=True),
    "min_train_nodes": Range(1, integer=True),
    "min_evaluate_nodes": Range(0, integer=True),
    "min_available_nodes": Range(1, integer=True),
    "num_malicious_nodes": Range(0, integer=True),
    "num_nodes_to_select": Range(1, integer=True),
}


def parameter_ranges(strategy) -> dict[str, Range]:
    """The ranges that apply to ``strategy``: :data:`FLOWER_RANGES`, then its class's own
    ``parameter_ranges`` over them."""
    return {**FLOWER_RANGES, **getattr(type(strategy), "parameter_ranges", {})}


def check_parameters(strategy) -> None:
    """Check every declared parameter ``strategy`` has, naming ``strategy.KEY`` at fault."""
    for key, allowed in parameter_ranges(strategy).items():
        if hasattr(strategy, key):
            allowed.check(f"strategy.{key}", getattr(strategy, key))


def check_settings(node) -> None:
    """The declared parameters of ``node`` (a ``strategy`` config node), checked before its class is
    built: a Flower constructor that checks a value itself (FedTrimmedAvg's ``beta``) raised its own
    words, with the whole config dumped, before :func:`check_parameters` could name the setting."""
    from hydra.utils import get_class

    try:
        cls = get_class(str(node["_target_"]))
    except Exception:  # noqa: BLE001 - no class to look up: building it says what is wrong
        return
    for key, allowed in {**FLOWER_RANGES, **getattr(cls, "parameter_ranges", {})}.items():
        if key in node:
            allowed.check(f"strategy.{key}", node[key])
