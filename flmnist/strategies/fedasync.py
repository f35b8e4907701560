"""FedAsync: Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", OPT workshop 2019
(arXiv:1903.03934).

On every arrival of a client model x_new trained from version tau, at server version t:

    a_t = alpha * s(t - tau)
    x  <- (1 - a_t) x + a_t x_new

with a staleness function s (:mod:`flmnist.strategies.staleness`; the paper's defaults are
alpha = 0.6 and polynomial s with a = 0.5). Clients may add the proximal term
(rho / 2) ||x - x_tau||^2 to their loss (``rho``, sent to clients as ``proximal-mu``).
"""

from __future__ import annotations

from flmnist.core.checks import check_number
from flmnist.strategies.asynchronous import AsyncStrategy, Weights
from flmnist.strategies.staleness import Polynomial, Staleness, staleness_or


class FedAsync(AsyncStrategy):
    """Mix every arriving model into the global one with weight alpha * s(staleness)."""

    weight_by_examples = False  # an update's examples do not weigh in its mixing (the effect guard weighs equally too)

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: Staleness | None = None,
        rho: float = 0.0,
        max_staleness: int | None = None,
    ) -> None:
        self.alpha = check_number("strategy.alpha", alpha, 0.0, 1.0, low_open=True)
        super().__init__(max_staleness=max_staleness, proximal_mu=check_number("strategy.rho", rho))
        self.staleness = staleness_or(staleness, Polynomial(0.5))

    def mixing_weight(self, staleness: int) -> float:
        return self.alpha * self.staleness(staleness)

    def apply(self, model: Weights, update: Weights, num_examples: int, staleness: int) -> Weights:
        a = self.mixing_weight(staleness)
        return {k: (1.0 - a) * model[k] + a * update[k] for k in model}
