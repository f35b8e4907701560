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

from flmnist.errors import ConfigError


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
        if a < 0:
            raise ConfigError(f"strategy.staleness.a must be >= 0, got {a}")
        self.a = float(a)

    def __call__(self, staleness: int) -> float:
        return (staleness + 1.0) ** (-self.a)


class Hinge(Staleness):
    """s(tau) = 1 if tau <= b else 1 / (a (tau - b) + 1)."""

    def __init__(self, a: float = 10.0, b: int = 4) -> None:
        if a < 0 or b < 0:
            raise ConfigError(f"strategy.staleness.a and .b must be >= 0, got a={a}, b={b}")
        self.a, self.b = float(a), int(b)

    def __call__(self, staleness: int) -> float:
        return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)


class InverseSqrt(Staleness):
    """s(tau) = 1 / sqrt(1 + tau)."""

    def __call__(self, staleness: int) -> float:
        return 1.0 / math.sqrt(1.0 + staleness)
