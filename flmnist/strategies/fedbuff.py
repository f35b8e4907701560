"""FedBuff: Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022 (arXiv:2106.06639), Algorithm 1.

Clients return deltas Delta_k = x_k - x_tau (their trained model minus the model they
received). The server accumulates staleness-weighted deltas until K have arrived:

    Delta_bar = (1/K) sum_k s(tau_k) Delta_k                       (equal weights), or
    Delta_bar = sum_k n_k s(tau_k) Delta_k / sum_k n_k            (weighted by examples)

then takes a server step with learning rate eta_g and optional momentum beta:

    v <- beta v + Delta_bar;   x <- x + eta_g v

s defaults to 1 / sqrt(1 + tau). K defaults to 10 but never exceeds the number of nodes
training at once (the concurrency): a larger buffer would fill with several updates of one node.
"""

from __future__ import annotations

import logging

import numpy as np

from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError
from flmnist.strategies.asynchronous import AsyncStrategy, Weights
from flmnist.strategies.staleness import InverseSqrt, Staleness, staleness_or


class FedBuff(AsyncStrategy):
    """Buffer K staleness-weighted client deltas, then take one server step."""

    reply_delta = True

    def __init__(
        self,
        buffer_size: int = 10,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        staleness: Staleness | None = None,
        weight_by_examples: bool = True,
        max_staleness: int | None = None,
    ) -> None:
        super().__init__(max_staleness=max_staleness)
        self.buffer_size = self.configured_size = check_integer("strategy.buffer_size", buffer_size, 1)
        self.server_learning_rate = check_number("strategy.server_learning_rate", server_learning_rate, low_open=True)
        self.server_momentum = check_number("strategy.server_momentum", server_momentum, 0.0, 1.0, high_open=True)
        self.staleness = staleness_or(staleness, InverseSqrt())
        if not isinstance(weight_by_examples, bool):
            raise ConfigError(f"strategy.weight_by_examples must be true or false, got {weight_by_examples!r}")
        self.weight_by_examples = weight_by_examples
        self.buffer: Weights | None = None
        self.buffer_weight = 0.0
        self.buffer_count = 0
        self.momentum: Weights | None = None

    def limit_concurrency(self, concurrency: int) -> None:
        """K is at most the nodes training at once (of the configured K: a run resumed with more
        nodes than it started with gets its K back, not the smaller one its checkpoint holds)."""
        self.buffer_size = min(self.configured_size, concurrency)
        if self.buffer_size < self.configured_size:  # (said, as a note: the default K=10 on 2 nodes is the usual case)
            logging.getLogger("flwr").info(
                "FedBuff: strategy.buffer_size=%d is more than the %d nodes training at once (async_loop.concurrency, "
                "else the nodes found): each server step averages %d updates", self.configured_size, concurrency,
                self.buffer_size)

    def aggregate_size(self) -> int:
        return self.buffer_size

    def apply(self, model: Weights, update: Weights, num_examples: int, staleness: int) -> Weights | None:
        weight = float(num_examples) if self.weight_by_examples else 1.0
        scale = weight * self.staleness(staleness)
        if self.buffer is None:
            self.buffer = {k: np.zeros_like(v) for k, v in model.items()}
        for k in self.buffer:
            self.buffer[k] += scale * update[k]
        self.buffer_weight += weight
        self.buffer_count += 1
        if self.buffer_count < self.buffer_size:
            return None
        mean = {k: v / self.buffer_weight for k, v in self.buffer.items()}
        if self.server_momentum > 0:
            if self.momentum is None:
                self.momentum = mean
            else:
                self.momentum = {k: self.server_momentum * self.momentum[k] + mean[k] for k in mean}
            step = self.momentum
        else:
            step = mean
        self.buffer, self.buffer_weight, self.buffer_count = None, 0.0, 0
        if self.server_learning_rate == 1.0:
            return {k: model[k] + step[k] for k in model}
        return {k: model[k] + self.server_learning_rate * step[k] for k in model}

    def step_rejected(self, before: dict) -> None:
        """The buffer's step was rejected: its updates are dropped with it (the buffer stays empty)
        and the momentum is what it was before (it must not carry the rejected mean on)."""
        self.momentum = before["momentum"]  # never updated in place: apply assigns a new dict

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "buffer_weight": self.buffer_weight,
                "buffer_count": self.buffer_count, "momentum": self.momentum, "buffer_size": self.buffer_size}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
