"""The asynchronous loop's settings (``conf/config.yaml``'s ``async_loop`` section), checked.

Config checking only: the loop that uses them is :class:`~flmnist.engine.async_loop.AsyncLoop`.
"""

from __future__ import annotations

from dataclasses import dataclass

from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError


@dataclass(frozen=True)
class AsyncLoopSettings:
    """``conf/config.yaml``'s ``async_loop`` section; the constructor checks every value."""

    concurrency: int | None = None          # nodes training at once (None: all)
    max_server_updates: int | None = 100    # stop after this many server versions ...
    max_client_updates: int | None = None   # ... or client updates processed ...
    time_budget: float | None = None        # ... or seconds (virtual in simulation)
    eval_every: int = 10
    update_timeout: float = 600.0
    max_consecutive_failures: int = 50      # liveness: failed or rejected updates in a row
    progress_timeout: float = 3600.0        # liveness: seconds without a new server version
    prefetch: int = 1                       # deployment: a task queued behind a node's current one (0: none)

    def __post_init__(self) -> None:
        for key in ("concurrency", "max_server_updates", "max_client_updates"):
            check_integer(f"async_loop.{key}", getattr(self, key), 1, allow_none=True)
        check_number("async_loop.time_budget", self.time_budget, 0.0, low_open=True, allow_none=True)
        check_integer("async_loop.eval_every", self.eval_every, 1)
        check_integer("async_loop.max_consecutive_failures", self.max_consecutive_failures, 1)
        # (a second queued task would be timed from when it was sent, not from when it can start)
        check_integer("async_loop.prefetch", self.prefetch, 0, high=1)
        for key in ("update_timeout", "progress_timeout"):
            check_number(f"async_loop.{key}", getattr(self, key), 0.0, low_open=True)
        if not (self.max_server_updates or self.max_client_updates or self.time_budget):
            raise ConfigError("async_loop needs a stop: set max_server_updates, max_client_updates or time_budget")


PRIVACY_MECHANISMS = ("none", "central", "central_adaptive", "client", "local", "dpsgd")
NODE_METRICS = ("plain", "withheld")


@dataclass(frozen=True)
class PrivacySettings:
    """``conf/privacy/NAME.yaml`` (the ``privacy`` section); the constructor checks every value.
    The mechanisms themselves are :mod:`flmnist.engine.privacy`."""

    # none | central (client-level, server clips and noises) | central_adaptive (its clip adapted)
    # | client (nodes clip, server noises)
    # | local (each node clips and noises its own update) | dpsgd (sample-level, on the nodes)
    mechanism: str = "none"
    noise_multiplier: float = 1.0           # Gaussian noise std as a multiple of clipping_norm (sigma)
    clipping_norm: float = 1.0              # L2 bound on each node's update (its model minus the global model)
    target_delta: float = 1e-5              # the delta epsilon is reported at
    max_epsilon: float | None = None        # stop before the release that would spend more (null: no budget)
    # central_adaptive only (Andrew et al. 2019): clipping_norm is the first round's clip
    target_quantile: float = 0.5            # the fraction of updates the clip should leave unclipped
    clip_norm_lr: float = 0.2               # geometric step of the clip each round
    count_stddev: float | None = None       # noise std on the count of unclipped updates (> noise_multiplier)
    # plain: nodes send their training losses and evaluation counts un-noised (outside epsilon);
    # withheld (local's and dpsgd's default): they send none, and client evaluation must be off
    node_metrics: str = "plain"

    def __post_init__(self) -> None:
        if self.mechanism not in PRIVACY_MECHANISMS:
            raise ConfigError(f"privacy.mechanism must be one of {', '.join(PRIVACY_MECHANISMS)}, got "
                              f"{self.mechanism!r} (pick it with privacy=NAME: conf/privacy/)")
        check_number("privacy.noise_multiplier", self.noise_multiplier, 0.0, low_open=True)
        check_number("privacy.clipping_norm", self.clipping_norm, 0.0, low_open=True)
        check_number("privacy.target_delta", self.target_delta, 0.0, 1.0, low_open=True, high_open=True)
        check_number("privacy.max_epsilon", self.max_epsilon, 0.0, low_open=True, allow_none=True)
        check_number("privacy.target_quantile", self.target_quantile, 0.0, 1.0)
        check_number("privacy.clip_norm_lr", self.clip_norm_lr, 0.0, low_open=True)
        check_number("privacy.count_stddev", self.count_stddev, 0.0, low_open=True, allow_none=True)
        if self.node_metrics not in NODE_METRICS:
            raise ConfigError(f"privacy.node_metrics must be one of {', '.join(NODE_METRICS)}, got {self.node_metrics!r} "
                              "(withheld: nodes send no training losses; plain: they send them un-noised)")
        if self.mechanism == "central_adaptive" and not (self.count_stddev or 0.0) > self.noise_multiplier:
            raise ConfigError(
                f"privacy.count_stddev={self.count_stddev} must be more than privacy.noise_multiplier="
                f"{self.noise_multiplier:g}: the noisy count spends part of each round's privacy, and the updates' "
                "noise makes up the rest (noise multiplier (sigma^-2 - count_stddev^-2)^-1/2)")

    @property
    def on(self) -> bool:
        return self.mechanism != "none"
