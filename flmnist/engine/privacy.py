"""Client-level differential privacy, central model (``privacy=central``).

Synchronous strategies get Flower's own ``DifferentialPrivacyServerSideFixedClipping`` around a
plain FedAvg (or FedProx) and Flower's ``RdpAccountant`` (``flwr[dp]``, Google's
``dp-accounting``): each round the server clips every node's update (its model minus the global
model) to ``clipping_norm``, averages with equal weights and adds Gaussian noise of std
``noise_multiplier * clipping_norm / n`` for ``n`` nodes a round; each round is one Gaussian
release with noise multiplier ``noise_multiplier`` composed by the accountant (add-or-remove-one
node, no sampling amplification: conservative). The reply screen runs first, so a malformed reply
never reaches the clip; a rejected or missing reply counts as a zero update (the global model
itself), so every round averages exactly ``n`` updates, as the guarantee needs.

Asynchronous strategies are noised here, at each server update: FedBuff clips each delta, takes
the equal-weight mean of its K buffered deltas (staleness weights are at most 1) and adds noise of
std ``noise_multiplier * clipping_norm / K``; FedAsync clips each arriving model's difference from
the model its node was sent and adds noise of std ``noise_multiplier * clipping_norm`` to it before mixing it
in with weight alpha * s(staleness). A release in which one node has ``m`` updates (a fast node
twice in one buffer) is accounted with noise multiplier ``noise_multiplier / m``, its true one.

The unit is a node: epsilon bounds what the final and every intermediate global model reveal
about any one node's whole data set, against an honest-but-curious observer of the models.

``privacy=client`` is the same with the clip moved to the nodes (Flower's ``fixedclipping_mod``,
:mod:`flmnist.client.update_dp`): sync strategies get Flower's
``DifferentialPrivacyClientSideFixedClipping`` (it sends ``clipping_norm`` and noises the average
without clipping again), async ones the same noise as above. The server trusts no node's clip:
its screen rejects an update longer than ``clipping_norm`` (:mod:`flmnist.engine.reply_path`),
which then counts as a zero update. ``privacy=local`` is :mod:`flmnist.engine.local_privacy`.
"""

from __future__ import annotations

from collections import Counter
from logging import INFO, WARNING

import numpy as np
from flwr.common.logger import log

from flmnist.core.arrays import Weights
from flmnist.core.errors import ConfigError
from flmnist.protocol import messages as p
from flmnist.protocol.screen import l2_norm
from flmnist.protocol.settings import PrivacySettings

UNIT = "node (client-level): any one node's whole data set, added or removed"


def missing_extra(mechanism: str = "central") -> str | None:
    """Why ``privacy=...`` cannot run here (the accountant's package is missing), or None."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return (f"privacy={mechanism} needs Flower's DP accountant (Google's dp-accounting): "
                "pip install -e '.[privacy]' (or pip install 'flwr[dp]==1.41.0')")
    return None


def problem(settings: PrivacySettings, strategy) -> str | None:
    """Why ``settings`` cannot run with ``strategy`` here (a missing package, a strategy the
    accounting cannot cover), or None."""
    if not settings.on:
        return None
    if settings.mechanism == "dpsgd":
        import importlib.util

        if importlib.util.find_spec("opacus") is None:
            return "privacy=dpsgd needs Opacus: pip install -e '.[privacy]' (or pip install 'opacus==1.6.0')"
        if (mu := float(getattr(strategy, "proximal_mu", 0.0) or 0.0)) > 0:
            key = "strategy.rho" if hasattr(strategy, "alpha") else "strategy.proximal_mu"
            return (f"privacy=dpsgd with a proximal term ({key}={mu:g}, {type(strategy).__name__}): it is not "
                    f"part of DP-SGD here; set {key}=0 or use another strategy")
        return missing_extra("dpsgd")
    if settings.mechanism == "local":  # the server only post-processes noised updates: any strategy
        return missing_extra("local")
    from flmnist.strategies.asynchronous import AsyncStrategy

    if settings.mechanism == "central_adaptive" and isinstance(strategy, AsyncStrategy):
        return (f"privacy=central_adaptive is for synchronous strategies ({type(strategy).__name__} is "
                "asynchronous): use privacy=central or privacy=client with fixed clipping")
    return missing_extra(settings.mechanism) or strategy_problem(strategy, settings.mechanism)


def strategy_problem(strategy, mechanism: str = "central") -> str | None:
    """Why ``strategy`` cannot run under ``privacy=central`` (or ``client``) with accounted epsilon, or None."""
    from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    from flwr.serverapp.strategy import FedAvgM

    from flmnist.strategies.fedasync import FedAsync
    from flmnist.strategies.fedbuff import FedBuff

    name = type(strategy).__name__
    if isinstance(strategy, FedBuff):
        if strategy.server_momentum > 0:
            return ("strategy.server_momentum > 0: FedBuff's momentum mixes releases; "
                    f"use strategy.server_momentum=0.0 under privacy={mechanism}")
        return None
    if isinstance(strategy, FedAsync):
        return None
    if isinstance(strategy, FedAvgM):  # flmnist's FedAvg is FedAvgM with plain defaults
        if strategy.server_learning_rate != 1.0 or strategy.server_momentum != 0.0:
            return (f"{name} with a server step (server_learning_rate={strategy.server_learning_rate:g}, "
                    f"server_momentum={strategy.server_momentum:g}): Flower's accountant covers FedAvg's own "
                    "average only; use strategy.server_learning_rate=1.0 strategy.server_momentum=0.0")
        return None
    if type(strategy).aggregate_train is FlowerFedAvg.aggregate_train and isinstance(strategy, FlowerFedAvg):
        return None  # FedProx and plain FedAvg
    return (f"strategy {name} aggregates otherwise than FedAvg (a median, a trimmed mean, Krum, a server "
            "optimiser): one node's update can move its result by more than the clip allows, so no epsilon "
            "can be accounted for it. Use strategy=fedavg, fedprox, unweighted_fedavg, fedbuff or fedasync")


def sampled_per_round(strategy, num_nodes: int) -> int:
    """How many nodes Flower's ``configure_train`` samples a round (``sample_nodes``' rule)."""
    return max(int(num_nodes * strategy.fraction_train), strategy.min_train_nodes)


class Accountant:
    """Flower's ``RdpAccountant`` for one run, with the run's settings and a prospective budget check."""

    central = True  # the server adds the noise (every round averages exactly n updates)
    flower_composes = True  # Flower's fixed-clipping wrapper composes each release into ``rdp``

    def __init__(self, settings: PrivacySettings, population: int) -> None:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        self.settings, self.population = settings, population
        self.config = PrivacyConfig(target_delta=settings.target_delta, population_size=population,
                                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                                    max_epsilon=settings.max_epsilon)
        self.rdp = RdpAccountant(self.config)
        self.repeated: Counter = Counter()  # FedBuff: releases where one node had k > 1 updates -> count

    def event(self, sample_size: int, repeats: int = 1):
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(noise_multiplier=self.settings.noise_multiplier / repeats,
                                    sample_size=sample_size, population_size=self.population)

    def compose(self, sample_size: int, repeats: int = 1) -> None:
        self.rdp.compose(self.event(sample_size, repeats))
        if repeats > 1:
            self.repeated[repeats] += 1

    def would_exceed(self, sample_size: int, repeats: int = 1) -> bool:
        """Whether the next release would spend more than ``max_epsilon`` (False without a budget)."""
        return self.settings.max_epsilon is not None and self.rdp.would_exceed(self.event(sample_size, repeats))

    @property
    def epsilon(self) -> float:
        return self.rdp.get_privacy_spent().epsilon if self.rdp.num_releases else 0.0

    def check_first_release(self, sample_size: int) -> None:
        """A budget smaller than one release is a configuration error, said before training."""
        if self.settings.max_epsilon is not None and self.rdp.num_releases == 0 and self.would_exceed(sample_size):
            probe = Accountant(PrivacySettings(**{**self.settings.__dict__, "max_epsilon": None}), self.population)
            probe.compose(sample_size)
            raise ConfigError(
                f"privacy.max_epsilon={self.settings.max_epsilon:g} is less than one release spends "
                f"(epsilon {probe.epsilon:.3g} at delta {self.settings.target_delta:g} with "
                f"noise_multiplier={self.settings.noise_multiplier:g}): raise privacy.max_epsilon or "
                "privacy.noise_multiplier")

    def summary(self) -> dict:
        s = self.settings
        return {"mechanism": s.mechanism, "epsilon": round(self.epsilon, 6), "delta": s.target_delta,
                "noise_multiplier": s.noise_multiplier, "clipping_norm": s.clipping_norm,
                "max_epsilon": s.max_epsilon, "releases": self.rdp.num_releases, "unit": UNIT,
                "clipped_by": "each node (its update, checked by the server's screen)" if s.mechanism == "client"
                else "the server",
                # releases where one node had k updates in the buffer, accounted at noise_multiplier / k
                "repeated_releases": {str(k): n for k, n in sorted(self.repeated.items())},
                "accounting": "RDP (Flower's RdpAccountant), no sampling amplification"}

    def state_dict(self) -> dict:
        return {"rdp": self.rdp.state_dict(), "repeated": dict(self.repeated)}

    def load_state_dict(self, state: dict) -> None:
        # Flower's accountant refuses a state made under another config; the budget is the one
        # setting a resume may change (a larger one: config/resume.py), so the checkpoint's is replaced
        saved = state.get("rdp", state)  # (2026-12-04's checkpoints: Flower's state itself)
        rdp = {**saved, "config": {**saved["config"], "max_epsilon": self.settings.max_epsilon}}
        self.rdp.load_state_dict(rdp)
        self.repeated = Counter({int(k): n for k, n in state.get("repeated", {}).items()})

    def log_release(self, step: int, unit: str) -> None:
        log(INFO, "Privacy: epsilon %.4g at delta %g after %s %d (%d releases)", self.epsilon,
            self.settings.target_delta, unit, step, self.rdp.num_releases)


def plain_fedavg(strategy):
    """Flower's plain FedAvg with equal weights for flmnist's FedAvg (the same sampling); FedProx
    and plain FedAvg themselves, set to equal weights (the accountant requires them)."""
    from flwr.serverapp.strategy import FedAvg, FedAvgM

    if isinstance(strategy, FedAvgM):
        keys = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                "min_available_nodes", "arrayrecord_key", "configrecord_key",
                "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")
        return FedAvg(**{k: getattr(strategy, k) for k in keys}, weighted_by_key=p.UNIT_WEIGHT)
    strategy.weighted_by_key = p.UNIT_WEIGHT
    return strategy


def wrap_sync(strategy, settings: PrivacySettings, num_nodes: int):
    """Flower's server-side (``privacy=central``) or client-side (``privacy=client``) fixed-clipping
    DP wrapper with its accountant around a plain FedAvg (or FedProx) equal to ``strategy``'s;
    returns ``(wrapper, accountant, nodes per round)``."""
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    strategy = plain_fedavg(strategy)
    n = sampled_per_round(strategy, num_nodes)
    accountant = Accountant(settings, num_nodes)
    accountant.check_first_release(n)
    wrap = (DifferentialPrivacyClientSideFixedClipping if settings.mechanism == "client"
            else DifferentialPrivacyServerSideFixedClipping)
    wrapper = wrap(
        strategy, noise_multiplier=settings.noise_multiplier, clipping_norm=settings.clipping_norm,
        num_sampled_clients=n, accountant=accountant.rdp)
    return wrapper, accountant, n


def clip(delta: Weights, bound: float) -> Weights:
    """``delta`` scaled down to L2 norm ``bound`` if longer (Flower's FlatClip)."""
    norm = l2_norm(delta)
    if norm <= bound or norm == 0:
        return delta
    return {k: (v * (bound / norm)).astype(v.dtype) for k, v in delta.items()}


def noise(weights: Weights, std: float, rng: np.random.Generator) -> Weights:
    return {k: (v + rng.normal(0.0, std, v.shape)).astype(v.dtype) for k, v in weights.items()}


class AsyncPrivacy:
    """``privacy=central`` for FedBuff and FedAsync (see the module docstring)."""

    def __init__(self, settings: PrivacySettings, num_nodes: int) -> None:
        self.settings = settings
        self.accountant = Accountant(settings, num_nodes)
        # the operating system's entropy, not the run's seed: anyone with config.yaml could
        # regenerate noise drawn from that seed and subtract it from the released models
        self.rng = np.random.default_rng()
        self.pending: Counter = Counter()   # FedBuff: node name -> updates in the current buffer

    def release_size(self, strategy) -> int:
        return int(getattr(strategy, "buffer_size", 1))

    def check(self, strategy) -> None:
        self.accountant.check_first_release(self.release_size(strategy))

    def prepare(self, strategy, name: str, update: Weights, sent: Weights) -> Weights:
        """The clipped (FedBuff) or clipped, noised and accounted (FedAsync) update to apply
        (the caller checked the budget first). FedAsync's is clipped against ``sent``, the model its node
        trained from (against the current one, a stale update's data moved the release by up to 2 clips)."""
        c = self.settings.clipping_norm
        if strategy.reply_delta:  # FedBuff: a delta, noised with the whole buffer at its server step
            self.pending[name] += 1
            return clip(update, c)
        moved = clip({k: update[k] - sent[k] for k in sent}, c)
        noisy = noise(moved, self.settings.noise_multiplier * c, self.rng)
        self.accountant.compose(1)
        return {k: sent[k] + noisy[k] for k in sent}

    def buffer_full(self, strategy) -> bool:
        return getattr(strategy, "buffer_count", 0) + 1 >= self.release_size(strategy)

    def would_exceed_buffer(self, strategy, name: str) -> bool:
        repeats = max((self.pending + Counter([name])).values())
        return self.accountant.would_exceed(self.release_size(strategy), repeats)

    def released(self, strategy, before: Weights, after: Weights) -> Weights:
        """FedBuff's server step ``after`` with the buffer's noise added (std sigma C / K, times the
        server learning rate), and the release accounted."""
        k = self.release_size(strategy)
        repeats = max(self.pending.values()) if self.pending else 1
        self.pending.clear()
        step = {key: after[key] - before[key] for key in before}
        std = strategy.server_learning_rate * self.settings.noise_multiplier * self.settings.clipping_norm / k
        self.accountant.compose(k, repeats)
        if repeats > 1:
            log(WARNING, "Privacy: one node had %d updates in this buffer; accounted with noise multiplier %.3g",
                repeats, self.settings.noise_multiplier / repeats)
        return {key: before[key] + v for key, v in noise(step, std, self.rng).items()}

    def state_dict(self) -> dict:
        """Not the noise generator's state: with it, the checkpoint file would regenerate the noise."""
        return {"accountant": self.accountant.state_dict(), "pending": dict(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.pending = Counter(state.get("pending", {}))


# ---------------------------------------------------------------- privacy=dpsgd: sample level
SAMPLE_UNIT = "example (sample-level): any one training image of a node, added or removed"


class SampleAccountant:
    """``privacy=dpsgd``: each node's own epsilon, from the DP-SGD steps the server asked of it.

    A node that was sent ``k`` training tasks ran ``k * steps`` DP-SGD steps, each a Poisson
    sample with rate ``q = batch_size / n`` of its ``n`` images and Gaussian noise of multiplier
    ``noise_multiplier`` (:mod:`flmnist.ml.dpsgd`); dp-accounting's RDP accountant composes
    them. Every task sent counts, answered or not (the node may have trained and replied to
    someone watching). The run's ``epsilon`` is the largest node's. A task whose node's partition
    is not known yet (``unattributed``: tasks of synchronous node ids that have not replied, kept by
    :class:`~flmnist.engine.guard.Guarded`) counts against every partition until it is known.
    """

    central = False
    label = "DP-SGD on the nodes"

    def __init__(self, settings: PrivacySettings, sent, train_examples) -> None:
        self.settings, self.sent = settings, sent
        self.train_examples = tuple(int(n) for n in train_examples)  # partition -> images it trains on
        self.tasks: Counter = Counter()  # partition -> training tasks sent
        self.names: dict[int, str] = {}
        self.unattributed = 0  # tasks of node ids whose partition is not known yet (Guarded sets it)
        self._cache: dict[tuple[int, int], float] = {}

    def epsilon_of(self, partition: int, tasks: int | None = None) -> float:
        tasks = self.tasks[partition] if tasks is None else tasks
        if (partition, tasks) not in self._cache:
            from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
            from dp_accounting.rdp import RdpAccountant

            n = self.train_examples[partition]
            steps = tasks * self.sent.batches_per_update(n)
            rdp = RdpAccountant()
            if steps and n:
                step = PoissonSampledDpEvent(min(1.0, self.sent.batch_size / n),
                                             GaussianDpEvent(self.settings.noise_multiplier))
                rdp.compose(SelfComposedDpEvent(step, steps))
            self._cache[(partition, tasks)] = rdp.get_epsilon(self.settings.target_delta) if steps and n else 0.0
        return self._cache[(partition, tasks)]

    def task(self, partition: int, name: str, count: int = 1) -> None:
        """``count`` more tasks sent to ``partition`` (-1: one charged that did not go out after all)."""
        self.tasks[partition] += count
        self.names[partition] = name
        if self.tasks[partition] <= 0:
            del self.tasks[partition]

    def _charged(self, part: int, extra: int = 0) -> float:
        return self.epsilon_of(part, self.tasks[part] + self.unattributed + extra)

    @property
    def epsilon(self) -> float:
        parts = range(len(self.train_examples)) if self.unattributed else self.tasks
        return max((self._charged(part) for part in parts), default=0.0)

    def would_exceed(self, _per_round: int = 0, partitions=None) -> bool:
        """Whether one more task for any node (or those of ``partitions``) would pass the budget."""
        return self.would_exceed_by(lambda part: 1, partitions)

    def would_exceed_by(self, extra, partitions=None) -> bool:
        """Whether ``extra(partition)`` more tasks for any node (or those of ``partitions``) would pass the budget."""
        if self.settings.max_epsilon is None:
            return False
        parts = range(len(self.train_examples)) if partitions is None else partitions
        return any(self._charged(part, extra(part)) > self.settings.max_epsilon for part in parts)

    def check_first_release(self, _sample_size: int = 0) -> None:
        if self.settings.max_epsilon is not None and not self.tasks and self.would_exceed():
            worst = max(range(len(self.train_examples)), key=lambda part: self.epsilon_of(part, 1))
            raise ConfigError(
                f"privacy.max_epsilon={self.settings.max_epsilon:g} is less than one training task spends on "
                f"partition {worst} (epsilon {self.epsilon_of(worst, 1):.3g}): raise privacy.max_epsilon or "
                "privacy.noise_multiplier, or train fewer local steps")

    def summary(self) -> dict:
        s = self.settings
        # (unattributed tasks count against every partition, in its figure too: epsilon is the largest)
        parts = range(len(self.train_examples)) if self.unattributed else sorted(self.tasks)
        per_node = {self.names.get(part, str(part)): round(self._charged(part), 6) for part in parts}
        return {"mechanism": s.mechanism, "epsilon": round(self.epsilon, 6), "delta": s.target_delta,
                "noise_multiplier": s.noise_multiplier, "clipping_norm": s.clipping_norm,
                "max_epsilon": s.max_epsilon, "per_node": per_node,
                "releases": sum(self.tasks.values()) + self.unattributed, "unattributed_tasks": self.unattributed,
                "unit": SAMPLE_UNIT,
                "accounting": "RDP (dp-accounting), Poisson subsampling q = batch_size / n per DP-SGD step, "
                              "every training task sent"}

    def log_release(self, step: int, unit: str) -> None:
        log(INFO, "Privacy: epsilon %.4g at delta %g after %s %d (the most of any node; DP-SGD)", self.epsilon,
            self.settings.target_delta, unit, step)

    def state_dict(self) -> dict:
        return {"tasks": {str(k): v for k, v in self.tasks.items()}, "names": {str(k): v for k, v in self.names.items()},
                "unattributed": self.unattributed}

    def load_state_dict(self, state: dict) -> None:
        self.tasks = Counter({int(k): int(v) for k, v in state.get("tasks", {}).items()})
        self.names = {int(k): str(v) for k, v in state.get("names", {}).items()}
        self.unattributed = int(state.get("unattributed", 0))
