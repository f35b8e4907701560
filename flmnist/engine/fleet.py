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

from flmnist.core.checks import check_number
from flmnist.core.errors import ConfigError

KINDS = ("none", "homogeneous", "lognormal", "mixed")
DEVICE_KEYS = ("share", "speed", "latency", "bandwidth", "dropout")


def _number(key: str, value, low: float, open_low: bool = False, below: float | None = None) -> float:
    """A fleet setting as a float: finite, >= low (> low if open_low) and < below if given."""
    if below is None:
        return check_number(key, value, low, low_open=open_low)
    return check_number(key, value, low, below, low_open=open_low, high_open=True)


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
        if not profiles:
            raise ConfigError("a fleet needs at least one device profile (num_nodes >= 1)")
        for p in profiles:
            _number(f"fleet profile {p.name!r}: speed", p.speed, 0.0, open_low=True)
            _number(f"fleet profile {p.name!r}: latency", p.latency, 0.0)
            _number(f"fleet profile {p.name!r}: bandwidth", p.bandwidth, 0.0, open_low=True)
            _number(f"fleet profile {p.name!r}: dropout", p.dropout, 0.0, below=1.0)
        self.profiles = profiles
        self.base_throughput = _number("fleet.base_throughput", base_throughput, 0.0, open_low=True)
        self.jitter_sigma = _number("fleet.jitter_sigma", jitter_sigma, 0.0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
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
    """Build a fleet preset: ``none`` (no virtual clock), ``homogeneous``, ``lognormal``, ``mixed``.

    Every parameter is checked first, whatever the kind, naming its ``fleet.*`` key.
    """
    if kind not in KINDS:
        raise ConfigError(f"fleet.kind '{kind}' is unknown; valid: {', '.join(KINDS)}")
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    base_throughput = _number("fleet.base_throughput", base_throughput, 0.0, open_low=True)
    latency = _number("fleet.latency", latency, 0.0)
    bandwidth = _number("fleet.bandwidth", bandwidth, 0.0, open_low=True)
    dropout = _number("fleet.dropout", dropout, 0.0, below=1.0)
    jitter_sigma = _number("fleet.jitter_sigma", jitter_sigma, 0.0)
    sigma = _number("fleet.sigma", sigma, 0.0)
    devices = _devices(devices, latency, bandwidth, dropout) if kind == "mixed" else None
    if kind == "none":
        return None
    rng = np.random.default_rng([seed, 7919])
    if kind == "homogeneous":
        profiles = [DeviceProfile("device", 1.0, latency, bandwidth, dropout) for _ in range(num_nodes)]
    elif kind == "lognormal":
        speeds = rng.lognormal(0.0, sigma, num_nodes)
        profiles = [DeviceProfile(f"lognormal-{i}", float(s), latency, bandwidth, dropout) for i, s in enumerate(speeds)]
    else:  # mixed
        names = list(devices)
        shares = np.array([devices[n]["share"] for n in names])
        # Deal device classes in proportion to their shares (largest remainder), then shuffle.
        counts = np.floor(shares / shares.sum() * num_nodes).astype(int)
        for i in np.argsort(-(shares / shares.sum() * num_nodes - counts))[: num_nodes - counts.sum()]:
            counts[i] += 1
        order = rng.permutation(np.repeat(np.arange(len(names)), counts))
        profiles = [DeviceProfile(names[i], **{k: v for k, v in devices[names[i]].items() if k != "share"})
                    for i in order]
    return Fleet(profiles, base_throughput, jitter_sigma, seed)


def _devices(devices, latency: float, bandwidth: float, dropout: float) -> dict[str, dict[str, float]]:
    """A mixed fleet's device classes, checked: name -> share, speed, latency, bandwidth, dropout."""
    if not devices or not hasattr(devices, "items"):
        raise ConfigError("fleet.devices must map each device class of a mixed fleet to its "
                          f"{', '.join(DEVICE_KEYS)}, got {devices!r}")
    out = {}
    for name, d in devices.items():
        key = f"fleet.devices.{name}"
        if not hasattr(d, "keys") or set(d.keys()) - set(DEVICE_KEYS) or not {"share", "speed"} <= set(d.keys()):
            raise ConfigError(f"{key} must set share and speed (and optionally latency, bandwidth, dropout), "
                              f"got {d!r}")
        out[str(name)] = {
            "share": _number(f"{key}.share", d["share"], 0.0),
            "speed": _number(f"{key}.speed", d["speed"], 0.0, open_low=True),
            "latency": _number(f"{key}.latency", d.get("latency", latency), 0.0),
            "bandwidth": _number(f"{key}.bandwidth", d.get("bandwidth", bandwidth), 0.0, open_low=True),
            "dropout": _number(f"{key}.dropout", d.get("dropout", dropout), 0.0, below=1.0),
        }
    if sum(d["share"] for d in out.values()) <= 0:
        raise ConfigError("fleet.devices: the shares must not all be 0")
    return out
