"""Staleness functions s(tau): how much an update computed tau server versions ago counts.

Xie, Koyejo, Gupta, "Asynchronous Federated Optimization" (2019), section 5.2:

- constant:   s(tau) = 1
- polynomial: s(tau) = (tau + 1)^(-a)
- hinge:      s(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1)

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation" (AISTATS 2022):

- inverse square root: s(tau) = 1 / sqrt(1 + tau)   (FedBuff's default)

Staleness tau is counted in server model versions between dispatch and arrival.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError


class Staleness(ABC):
    """A staleness weight function; one method, small subclasses."""

    @abstractmethod
    def __call__(self, staleness: int) -> float:
        """Weight of an update ``staleness`` server versions old."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Constant(Staleness):
    """s(tau) = 1."""

    def __call__(self, staleness: int) -> float:
        return 1.0


class Polynomial(Staleness):
    """s(tau) = (tau + 1)^(-a)."""

    def __init__(self, a: float = 0.5) -> None:
        self.a = check_number("strategy.staleness.a", a)

    def __call__(self, staleness: int) -> float:
        return (staleness + 1.0) ** (-self.a)


class Hinge(Staleness):
    """s(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1)."""

    def __init__(self, a: float = 10.0, b: int = 4) -> None:
        self.a = check_number("strategy.staleness.a", a)
        self.b = check_integer("strategy.staleness.b", b, 0)

    def __call__(self, staleness: int) -> float:
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)


class InverseSqrt(Staleness):
    """s(tau) = 1 / sqrt(1 + tau)."""

    def __call__(self, staleness: int) -> float:
        return 1.0 / math.sqrt(1.0 + staleness)


def staleness_or(value, default: Staleness) -> Staleness:
    """A strategy's ``staleness`` parameter: a Staleness function, or ``default`` when None."""
    if value is None:
        return default
    if not isinstance(value, Staleness):
        raise ConfigError(
            f"strategy.staleness must be a staleness function (_target_: flmnist.strategies.staleness."
            f"Constant, Polynomial, Hinge or InverseSqrt) or null, got {value!r:.80}"
        )
    return value
