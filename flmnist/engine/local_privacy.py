"""Local differential privacy (``privacy=local``): each node's epsilon, counted by the server.

Each node clips its update (its model minus the model it was sent, or FedBuff's delta) to
``clipping_norm`` C and adds Gaussian noise of std ``noise_multiplier * C`` to every coordinate
before the reply leaves it (:mod:`flmnist.client.update_dp`, ``LocalDpMod``'s semantics). One
reply is one Gaussian release of L2 sensitivity C: a node whose data set is removed (or empty)
trains nothing and its clipped update is zero, so with its data or without it the update moves by
at most C. Whatever the server does with the noised replies (screen, average, any strategy) is
post-processing, so the guarantee holds against the server itself and anyone who sees a reply.

The server composes each node's releases with ``dp-accounting``'s RDP accountant: every training
task sent to the node counts (answered or not, as for DP-SGD), without sampling amplification
(the node's release does not depend on whether it was picked). The unit is a node's whole data
set; the run's ``epsilon`` is the largest node's.
"""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from flmnist.core.errors import ConfigError
from flmnist.engine.privacy import SampleAccountant

LOCAL_UNIT = ("node (client-level, local): any one node's whole data set, added or removed, "
              "against anyone who sees its replies, the server included")


def local_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian releases of noise multiplier ``noise_multiplier`` (RDP)."""
    if releases <= 0:
        return 0.0
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    rdp = RdpAccountant()
    rdp.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), releases))
    return rdp.get_epsilon(delta)


class LocalAccountant(SampleAccountant):
    """``privacy=local``: each node's epsilon from the training tasks sent to it (one Gaussian
    release each). The same bookkeeping as DP-SGD's :class:`SampleAccountant` (tasks per partition,
    the budget checked before a task is sent, the state in checkpoints); only the figure differs."""

    label = "local DP on the nodes"

    def epsilon_of(self, partition: int, tasks: int | None = None) -> float:
        tasks = self.tasks[partition] if tasks is None else tasks
        if (partition, tasks) not in self._cache:
            s = self.settings
            self._cache[(partition, tasks)] = local_epsilon(s.noise_multiplier, tasks, s.target_delta)
        return self._cache[(partition, tasks)]

    def check_first_release(self, _sample_size: int = 0) -> None:
        if self.settings.max_epsilon is not None and not self.tasks and self.would_exceed():
            raise ConfigError(
                f"privacy.max_epsilon={self.settings.max_epsilon:g} is less than one local DP release spends "
                f"(epsilon {self.epsilon_of(0, 1):.3g} at delta {self.settings.target_delta:g} with "
                f"noise_multiplier={self.settings.noise_multiplier:g}): raise privacy.max_epsilon or "
                "privacy.noise_multiplier")

    def summary(self) -> dict:
        out = super().summary()
        out.update(unit=LOCAL_UNIT, accounting="RDP (dp-accounting), one Gaussian release (sensitivity clipping_norm) "
                                               "per training task sent to the node, no sampling amplification")
        return out

    def log_release(self, step: int, unit: str) -> None:
        log(INFO, "Privacy: epsilon %.4g at delta %g after %s %d (the most of any node; local DP)", self.epsilon,
            self.settings.target_delta, unit, step)
