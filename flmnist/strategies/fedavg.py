"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017), with an optional server step.

Round t: every sampled client k starts from w_t, trains locally and returns w_k;
the server averages by examples, w_avg = sum_k n_k w_k / sum_k n_k, then takes
the server step (Flower's FedAvgM convention, Hsu et al. 2019):

    g = w_t - w_avg;   v <- m v + g (m > 0);   w_{t+1} = w_t - eta * v

With server learning rate eta = 1 and momentum m = 0 the step is skipped and
w_{t+1} = w_avg exactly (plain FedAvg). It is Flower's FedAvgM with FedAvg's defaults;
replies are screened by :class:`~flmnist.engine.guard.Guarded` like every strategy's.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM


class FedAvg(FedAvgM):
    """Flower's FedAvgM defaulting to plain FedAvg (server learning rate 1, no momentum)."""

    # FedAvgM's state: the model it steps from and the server momentum (flmnist.strategies.state).
    checkpoint_state = ("current_arrays", "momentum_vector")

    def __init__(self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.0, **kwargs) -> None:
        super().__init__(server_learning_rate=server_learning_rate, server_momentum=server_momentum, **kwargs)
