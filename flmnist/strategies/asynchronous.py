"""The interface of asynchronous strategies: a rule applied to each arriving client update.

The loop that dispatches work and collects replies is :mod:`flmnist.engine.async_loop`; a
strategy only says how an update changes the global model. Weights are dicts of numpy
arrays (name -> array), the global model has a version number, and staleness is the
number of versions between dispatch and arrival.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from flmnist.core.arrays import Weights
from flmnist.core.checks import check_integer, check_number


class AsyncStrategy(ABC):
    """Base class of FedAsync and FedBuff."""

    #: clients reply with x_k - x_dispatched instead of x_k
    reply_delta: bool = False

    def __init__(self, max_staleness: int | None = None, proximal_mu: float = 0.0) -> None:
        self.max_staleness = check_integer("strategy.max_staleness", max_staleness, 0, allow_none=True)
        self.proximal_mu = check_number("strategy.proximal_mu", proximal_mu)

    def accepts(self, staleness: int) -> bool:
        """Whether an update this stale may be applied (``max_staleness`` drops older ones)."""
        return self.max_staleness is None or staleness <= self.max_staleness

    @abstractmethod
    def apply(self, model: Weights, update: Weights, num_examples: int, staleness: int) -> Weights | None:
        """Fold one update in; return the new global weights, or None if nothing changed yet."""

    def limit_concurrency(self, concurrency: int) -> None:
        """Called once by the loop with the number of nodes kept busy."""

    def aggregate_size(self) -> int | None:
        """How many client updates one server step averages (FedBuff: its buffer), or None if each
        update is applied on its own. The effect guard judges an arriving update among as many
        recent ones, so an attacker's share in the guard's aggregate is its share in the real one."""
        return None

    def state_dict(self) -> dict:
        """Strategy state to checkpoint (buffers, momentum)."""
        return {}

    def step_rejected(self, before: dict) -> None:
        """The server step :meth:`apply` just returned was rejected (its aggregate unsound): forget
        what it added to lasting state. ``before``: :meth:`state_dict` taken before that ``apply``."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
