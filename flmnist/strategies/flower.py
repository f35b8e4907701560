"""Flower's own FedProx, FedAvgM and FedAdam, with flmnist's validation, hooks and recording.

- FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020;
  clients minimise f_k(w) + (mu/2)||w - w_t||^2 (``proximal-mu`` is sent to clients).
- FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution", 2019;
  v <- m v + (w_t - w_avg), w_{t+1} = w_t - eta v.
- FedAdam: Reddi et al., "Adaptive Federated Optimization", ICLR 2021; Adam on the
  pseudo-gradient w_avg - w_t with server learning rate ``eta`` and adaptivity ``tau``.

Each class only combines :class:`FlmnistStrategy` with Flower's implementation;
their parameters are Flower's (see ``conf/strategy/*.yaml``).
"""

from __future__ import annotations

from flwr.serverapp import strategy as flower

from flmnist.strategies.base import FlmnistStrategy


class FedProx(FlmnistStrategy, flower.FedProx):
    """Flower's FedProx with flmnist's validation, hooks and recording."""


class FedAvgM(FlmnistStrategy, flower.FedAvgM):
    """Flower's FedAvgM with flmnist's validation, hooks and recording."""


class FedAdam(FlmnistStrategy, flower.FedAdam):
    """Flower's FedAdam with flmnist's validation, hooks and recording."""
