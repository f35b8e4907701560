"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017), with an optional server step.

Round t: every sampled client k starts from w_t, trains locally and returns w_k;
the server averages by examples, w_avg = sum_k n_k w_k / sum_k n_k, then takes
the server step (Flower's FedAvgM convention, Hsu et al. 2019):

    g = w_t - w_avg;   v <- m v + g (m > 0);   w_{t+1} = w_t - eta * v

With server learning rate eta = 1 and momentum m = 0 the step is skipped and
w_{t+1} = w_avg exactly (plain FedAvg). Replies are validated and hooks called by
:class:`~flmnist.strategies.base.FlmnistStrategy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flwr.serverapp.strategy import FedAvgM as FlowerFedAvgM

from flmnist.errors import ConfigError
from flmnist.evaluation import EvaluationHook
from flmnist.fleet import Fleet
from flmnist.recorder import RunRecorder
from flmnist.strategies.base import FlmnistStrategy


class FedAvg(FlmnistStrategy, FlowerFedAvgM):
    """FedAvg with reply validation, evaluation hooks and an optional server learning rate/momentum."""

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        min_available_nodes: int = 2,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.0,
        hooks: Sequence[EvaluationHook] = (),
        recorder: RunRecorder | None = None,
        train_metrics_aggr_fn: Callable | None = None,
        evaluate_metrics_aggr_fn: Callable | None = None,
        fleet: Fleet | None = None,
        virtual_timeout: float = 600.0,
        checkpoint_every: int = 0,
    ) -> None:
        if not server_learning_rate > 0:
            raise ConfigError(f"strategy.server_learning_rate must be > 0, got {server_learning_rate}")
        if not 0 <= server_momentum < 1:
            raise ConfigError(f"strategy.server_momentum must be in [0, 1), got {server_momentum}")
        super().__init__(
            hooks=hooks,
            recorder=recorder,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
            fleet=fleet,
            virtual_timeout=virtual_timeout,
            checkpoint_every=checkpoint_every,
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            server_learning_rate=server_learning_rate,
            server_momentum=server_momentum,
        )
