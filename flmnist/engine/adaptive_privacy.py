"""Client-level DP with adaptive clipping (``privacy=central_adaptive``, Andrew et al. 2019).

Flower 1.41's ``DifferentialPrivacyServerSideAdaptiveClipping`` around a plain FedAvg (or
FedProx), with two corrections and the accounting it lacks:

- Each round the server clips every node's update to the current clip ``C_t``, averages them
  with equal weights and adds Gaussian noise of std ``z * C_t / n``; it also counts the clipped
  updates, adds Gaussian noise of std ``count_stddev`` to the count, and moves the clip
  geometrically towards the ``target_quantile`` of the update norms:
  ``C_{t+1} = C_t * exp(-clip_norm_lr * (unclipped fraction - target_quantile))``. Flower 1.41
  passes the noisy fraction of *clipped* updates into that rule, which drives the clip away from
  its target (more clipping shrinks the clip further), and it updates the clip before it adds
  the noise, which it then scales to the next round's clip instead of the one the updates were
  clipped to (too little noise when the clip shrinks); :class:`AdaptiveClipping` passes the
  unclipped fraction, as the paper does, and noises with the clip used.
- The round releases two Gaussian queries: the sum of clipped updates (sensitivity ``C_t``, noise
  multiplier ``z``) and the count (sensitivity 1 under add-or-remove-one node: a removed node is a
  zero update, never clipped; noise multiplier ``count_stddev``). Together they are one Gaussian
  release of noise multiplier ``sigma`` with ``sigma^-2 = z^-2 + count_stddev^-2``. flmnist sets
  ``z = (noise_multiplier^-2 - count_stddev^-2)^-1/2``, so every round costs exactly what a
  ``privacy=central`` round of ``noise_multiplier`` costs, and composes it with the same
  :class:`~flmnist.engine.privacy.Accountant`. (Flower's own calibration, with ``(2 *
  count_stddev)^-2``, assumes centred bits of sensitivity 1/2, which its count does not use.)

The clip is public (it is computed from noised counts only) and reported per round
(``clipping_norm`` in ``metrics.csv``); it is part of the checkpoint. Synchronous strategies only.
"""

from __future__ import annotations

from flmnist.engine.privacy import Accountant, sampled_per_round
from flmnist.protocol.settings import PrivacySettings


def update_noise_multiplier(settings: PrivacySettings) -> float:
    """``z``: the updates' noise multiplier that, with the count's, spends ``noise_multiplier``."""
    return (settings.noise_multiplier ** -2 - settings.count_stddev ** -2) ** -0.5


def adaptive_wrapper_class():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping

    class AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
        """Flower's server-side adaptive clipping with the paper's update rule (see the module docstring)."""

        checkpoint_state = ("clipping_norm",)  # a resumed run goes on from the clip it reached

        def _geometric_update(self, clipped_fraction: float) -> None:
            self.used_clip = self.clipping_norm  # the clip this round's updates were clipped to
            super()._geometric_update(1.0 - clipped_fraction)  # the unclipped fraction, as in Andrew et al.

        def _add_noise_to_aggregated_arrays(self, aggregated):
            adapted, self.clipping_norm = self.clipping_norm, self.used_clip  # noise for the clip used
            try:
                return super()._add_noise_to_aggregated_arrays(aggregated)
            finally:
                self.clipping_norm = adapted

    return AdaptiveClipping


class AdaptiveAccountant(Accountant):
    """:class:`Accountant` for ``central_adaptive``: flmnist composes each round (Flower's adaptive
    wrapper has no accountant) and reports the clip."""

    flower_composes = False

    def __init__(self, settings: PrivacySettings, population: int) -> None:
        super().__init__(settings, population)
        self.wrapper = None
        self.clips: list[float] = []  # the clip each round used

    @property
    def clip(self) -> float:
        return float(self.wrapper.clipping_norm)

    def summary(self) -> dict:
        s = self.settings
        out = super().summary()
        out.update(clipping_norm=round(self.clip, 6), initial_clipping_norm=s.clipping_norm,
                   target_quantile=s.target_quantile, clip_norm_lr=s.clip_norm_lr, count_stddev=s.count_stddev,
                   update_noise_multiplier=round(update_noise_multiplier(s), 6),
                   accounting="RDP (Flower's RdpAccountant), no sampling amplification; each round the noised sum "
                              "and the noised count of clipped updates, one Gaussian release of noise_multiplier")
        return out


def wrap_adaptive(strategy, settings: PrivacySettings, num_nodes: int):
    """:class:`AdaptiveClipping` around a plain FedAvg (or FedProx) equal to ``strategy``'s;
    returns ``(wrapper, accountant, nodes per round)``."""
    from flmnist.engine.privacy import plain_fedavg

    strategy = plain_fedavg(strategy)
    n = sampled_per_round(strategy, num_nodes)
    accountant = AdaptiveAccountant(settings, num_nodes)
    accountant.check_first_release(n)
    wrapper = adaptive_wrapper_class()(
        strategy, noise_multiplier=settings.noise_multiplier, num_sampled_clients=n,
        initial_clipping_norm=settings.clipping_norm, target_clipped_quantile=settings.target_quantile,
        clip_norm_lr=settings.clip_norm_lr, clipped_count_stddev=settings.count_stddev)
    wrapper.noise_multiplier = update_noise_multiplier(settings)  # not Flower's calibration: see the docstring
    accountant.wrapper = wrapper
    return wrapper, accountant, n
