"""Device fleets for simulation: how long each client update takes on a virtual clock.

Each node has a profile: relative compute speed (training throughput for the model,
relative to ``base_throughput`` examples/s), network latency (s) and bandwidth (MB/s),
and a dropout probability. The duration of one client update is

    compute = examples / (base_throughput * speed) * jitter,   jitter ~ LogNormal(0, jitter_sigma)
    network = 2 * latency + (bytes down + bytes up) / (bandwidth * 1e6)

drawn from a generator seeded by (run seed, node, that node's update count), so the
same seed gives the same durations on any machine, in any real arrival order.
A dropped update never arrives; the server notices after its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flmnist.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    speed: float          # relative training throughput (1.0 = base_throughput)
    latency: float        # seconds, one way
    bandwidth: float      # MB/s
    dropout: float = 0.0  # probability that an update never arrives


@dataclass(frozen=True)
class UpdateTiming:
    duration: float       # virtual seconds from dispatch to arrival
    dropped: bool


class Fleet:
    """The device profiles of ``num_nodes`` nodes and the duration model."""

    def __init__(self, profiles: list[DeviceProfile], base_throughput: float, jitter_sigma: float, seed: int) -> None:
        if base_throughput <= 0:
            raise ConfigError(f"fleet.base_throughput must be > 0, got {base_throughput}")
        for p in profiles:
            if p.speed <= 0 or p.bandwidth <= 0 or p.latency < 0 or not 0 <= p.dropout < 1:
                raise ConfigError(f"fleet profile {p} has a non-positive speed/bandwidth or dropout outside [0, 1)")
        self.profiles = profiles
        self.base_throughput = base_throughput
        self.jitter_sigma = jitter_sigma
        self.seed = seed

    def profile(self, node: int) -> DeviceProfile:
        return self.profiles[node % len(self.profiles)]

    def timing(self, node: int, update_index: int, examples: int, model_bytes: int) -> UpdateTiming:
        """Duration of ``node``'s ``update_index``-th update (deterministic in the seed)."""
        p = self.profile(node)
        rng = np.random.default_rng([self.seed, node, update_index])
        jitter = float(rng.lognormal(0.0, self.jitter_sigma)) if self.jitter_sigma > 0 else 1.0
        dropped = bool(rng.random() < p.dropout)
        compute = examples / (self.base_throughput * p.speed) * jitter
        network = 2 * p.latency + 2 * model_bytes / (p.bandwidth * 1e6)
        return UpdateTiming(compute + network, dropped)


def make_fleet(
    kind: str,
    num_nodes: int,
    seed: int,
    base_throughput: float = 500.0,
    latency: float = 0.02,
    bandwidth: float = 2.5,
    dropout: float = 0.0,
    jitter_sigma: float = 0.1,
    sigma: float = 0.5,
    devices: dict | None = None,
) -> Fleet | None:
    """Build a fleet preset: ``none`` (no virtual clock), ``homogeneous``, ``lognormal``, ``mixed``."""
    if kind == "none":
        return None
    rng = np.random.default_rng([seed, 7919])
    if kind == "homogeneous":
        profiles = [DeviceProfile("device", 1.0, latency, bandwidth, dropout) for _ in range(num_nodes)]
    elif kind == "lognormal":
        if sigma < 0:
            raise ConfigError(f"fleet.sigma must be >= 0, got {sigma}")
        speeds = rng.lognormal(0.0, sigma, num_nodes)
        profiles = [DeviceProfile(f"lognormal-{i}", float(s), latency, bandwidth, dropout) for i, s in enumerate(speeds)]
    elif kind == "mixed":
        if not devices:
            raise ConfigError("fleet.devices must list the device classes of a mixed fleet")
        names = list(devices)
        shares = np.array([float(devices[n]["share"]) for n in names])
        if (shares < 0).any() or shares.sum() <= 0:
            raise ConfigError("fleet.devices shares must be >= 0 and not all 0")
        # Deal device classes in proportion to their shares (largest remainder), then shuffle.
        counts = np.floor(shares / shares.sum() * num_nodes).astype(int)
        for i in np.argsort(-(shares / shares.sum() * num_nodes - counts))[: num_nodes - counts.sum()]:
            counts[i] += 1
        order = rng.permutation(np.repeat(np.arange(len(names)), counts))
        profiles = []
        for i in order:
            d = devices[names[i]]
            profiles.append(DeviceProfile(
                names[i], float(d["speed"]), float(d.get("latency", latency)),
                float(d.get("bandwidth", bandwidth)), float(d.get("dropout", dropout)),
            ))
    else:
        raise ConfigError(f"fleet.kind '{kind}' is unknown; valid: none, homogeneous, lognormal, mixed")
    return Fleet(profiles, base_throughput, jitter_sigma, seed)
