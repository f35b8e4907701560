"""FedSGD with a server-side Adam step that is ``torch.optim.Adam``'s (seed 003).

Round t: every sampled node k starts from w_t and takes ONE SGD step on one batch at the
client learning rate ``eta_l`` (``client.local_steps=1``), replying w_k = w_t - eta_l g_k. The
server recovers the average gradient (in float64, so a zero gradient stays exactly zero)

    g = sum_k a_k (w_t - w_k) / eta_l,   a_k = weight_k / sum_j weight_j   (``weighted_by_key``)

and applies one step of ``torch.optim.Adam`` (no AMSGrad, no weight decay) with lr ``eta``,
betas (``beta_1``, ``beta_2``) and eps ``tau``:

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    w_{t+1} = w_t - (eta / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + tau)

Why not Flower's FedAdam: with client lr 1 and one local step it is Adam on the averaged
gradient, but not torch's (``flwr/serverapp/strategy/fedadam.py``, 1.41): its bias correction
uses ``server_round + 1.0`` where Adam uses the step count t (round 1 is corrected as if it
were step 2: the first step is 0.744 times Adam's at betas 0.9/0.999), its ``tau`` is added to
sqrt(v) before the bias correction (Adam adds eps to sqrt(v)/sqrt(1 - b2^t)), and its betas
default to 0.9/0.99 (Adam: 0.9/0.999). ``tests/test_seeds.py`` shows both.

The step count t counts Adam's steps taken (``adam_steps``), as ``torch.optim.Adam``'s does: a
round whose replies were all rejected, or whose aggregate was, takes no step and does not count
(the server round did: a first step in round 2 was corrected as Adam's second, 0.744 times its
size). The moments ``m_t``, ``v_t``, ``current_arrays`` (FedOpt's attributes) and ``adam_steps``
are declared in ``checkpoint_state`` (:mod:`flmnist.strategies.state`): they are checkpointed,
so a resumed run goes on with the right bias correction, and rolled back with a rejected aggregate. With more than one local step, g is the nodes' average model change divided by
``eta_l`` (a pseudo-gradient).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy.fedopt import FedOpt

from flmnist.core.arrays import to_record
from flmnist.core.errors import ConfigError


class FedSGD(FedOpt):
    """FedSGD: average the nodes' one-step gradients, then one ``torch.optim.Adam`` step."""

    # The model of the round and Adam's moments (flmnist.strategies.state).
    checkpoint_state = ("current_arrays", "m_t", "v_t", "adam_steps")

    def __init__(self, *, eta: float = 1e-4, eta_l: float = 1.0, beta_1: float = 0.9, beta_2: float = 0.999,
                 tau: float = 1e-8, **kwargs) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau, **kwargs)
        self.adam_steps = 0  # Adam steps taken (t of the last one)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        if self.current_arrays is None:
            raise ConfigError("FedSGD: configure_train must send the global model before aggregate_train")
        contents = [msg.content for msg in valid]
        weights = np.array([float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents])
        shares = weights / weights.sum()
        w = {k: v.astype(np.float64) for k, v in self.current_arrays.items()}
        g = {k: np.zeros_like(v) for k, v in w.items()}
        for share, content in zip(shares, contents):
            arrays = next(iter(content.array_records.values()))
            for k in g:
                g[k] += share * (w[k] - arrays[k].numpy().astype(np.float64))
        g = {k: v / self.eta_l for k, v in g.items()}

        # (a checkpoint written before adam_steps existed holds moments but no count: its round, as then)
        t = self.adam_steps + 1 if self.adam_steps or self.m_t is None else int(server_round)
        b1, b2 = self.beta_1, self.beta_2
        m = self.m_t or {k: np.zeros_like(v) for k, v in g.items()}
        v = self.v_t or {k: np.zeros_like(x) for k, x in g.items()}
        # New dicts, never in-place updates: Guarded rolls back by restoring the old references.
        self.m_t = {k: b1 * m[k] + (1 - b1) * g[k] for k in g}
        self.v_t = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in g}
        step_size = self.eta / (1 - b1**t)
        root_bc2 = np.sqrt(1 - b2**t)
        new = {k: w[k] - step_size * self.m_t[k] / (np.sqrt(self.v_t[k]) / root_bc2 + self.tau) for k in g}
        dtypes = {k: x.dtype for k, x in self.current_arrays.items()}
        arrays = to_record({k: x.astype(dtypes[k]) for k, x in new.items()})
        self.adam_steps = t
        return arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)
